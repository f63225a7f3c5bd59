// SPDX-License-Identifier: EUPL-1.2
//! Who may talk to the server, checked before any handler runs:
//!
//! - a Host a browser could not have been tricked into: while the server listens on a loopback
//!   address, a request must name `localhost`, a loopback address or the bound address as its
//!   Host (a web page on a name that resolves to 127.0.0.1 — DNS rebinding — gets 403);
//! - the API key (`--api-key` or `MLXR_API_KEY`), when there is one, as `Authorization: Bearer
//!   KEY` (or Anthropic's `x-api-key: KEY`) on every route but `GET /health` (401 otherwise);
//! - JSON bodies only: a POST must say `Content-Type: application/json` (415 otherwise), so a
//!   page's cross-origin form or `text/plain` fetch cannot reach a handler without the browser's
//!   preflight.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The checks for one server.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    key: Option<String>,
    /// Listening on a loopback address only: Hosts are checked.
    loopback: bool,
}

impl Access {
    /// The checks for a server listening on `bound` with `key` (an empty key counts as none).
    pub(crate) fn new(key: Option<String>, bound: IpAddr) -> Access {
        Access { key: key.filter(|k| !k.is_empty()), loopback: bound.is_loopback() }
    }

    /// Whether the server is reachable from other machines without a key (worth a warning).
    pub(crate) fn open_to_the_network(&self) -> bool {
        !self.loopback && self.key.is_none()
    }

    fn check(&self, request: &Request) -> Result<(), ApiError> {
        let headers = request.headers();
        if self.loopback
            && let Some(host) = headers.get(header::HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            && !is_local_host(&host)
        {
            return Err(ApiError::foreign_host(&host));
        }
        let open = request.method() == Method::GET && request.uri().path() == "/health";
        if let (Some(key), false) = (&self.key, open) {
            // OpenAI's clients send a bearer token; Anthropic's send `x-api-key`.
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer)
                .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim));
            if !given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
                return Err(ApiError::unauthorised());
            }
        }
        if request.method() == Method::POST {
            let content_type =
                headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            if !content_type.as_deref().is_some_and(is_json) {
                return Err(ApiError::not_json(content_type.as_deref()));
            }
        }
        Ok(())
    }
}

/// The middleware: the request goes on only if it passes every check.
pub(crate) async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    match access.check(&request) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            let unauthorised = e.status == axum::http::StatusCode::UNAUTHORIZED;
            let mut response = e.into_response();
            if unauthorised {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// Equal keys, compared in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `application/json`, with parameters or not, in any case.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// `localhost`, `*.localhost` or a loopback address, with or without a port.
fn is_local_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts_are_told_apart_from_others() {
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:1",
            "127.0.0.1:80",
            "127.1.2.3",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(is_local_host(ok), "{ok}");
        }
        for bad in
            ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "10.0.0.1", "[::2]:80", "localhost.evil"]
        {
            assert!(!is_local_host(bad), "{bad}");
        }
    }

    #[test]
    fn keys_and_content_types_are_read_as_clients_send_them() {
        assert_eq!(bearer("Bearer sk-1"), Some("sk-1"));
        assert_eq!(bearer("bearer   sk-1 "), Some("sk-1"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("sk-1"), None);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"abcd"));
        assert!(is_json("application/json") && is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("text/plain") && !is_json("application/jsonx") && !is_json(""));
        assert!(Access::new(None, "0.0.0.0".parse().unwrap()).open_to_the_network());
        assert!(!Access::new(Some("k".into()), "0.0.0.0".parse().unwrap()).open_to_the_network());
        assert!(!Access::new(Some(String::new()), "127.0.0.1".parse().unwrap()).open_to_the_network());
    }
}
