// SPDX-License-Identifier: EUPL-1.2
//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a 4xx or 5xx
//! status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) kind: &'static str,
    pub(crate) param: Option<String>,
    pub(crate) code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code }
    }

    /// 400: the request is malformed or a field is out of range.
    pub(crate) fn invalid(param: Option<&str>, code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", Some(code), message);
        e.param = param.map(str::to_owned);
        e
    }

    /// 404: no such model.
    pub(crate) fn model_not_found(requested: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("the model {requested:?} does not exist; this server serves {served:?}"),
        );
        e.param = Some("model".to_owned());
        e
    }

    /// 404: no such path.
    pub(crate) fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("unknown_url"),
            format!("no such endpoint: {method} {path}"),
        )
    }

    /// 413: the body is over the limit.
    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 408: the body did not arrive in time.
    pub(crate) fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_timeout"),
            format!("the request body did not arrive within {} s", limit.as_secs_f64()),
        )
    }

    /// 429: the queue is full.
    pub(crate) fn queue_full(queued: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("queue_full"),
            format!("the server is busy: {queued} requests are already waiting; try again later"),
        )
    }

    /// 503: waited too long, or the server is stopping.
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("server_busy"), message)
    }

    /// 500: the engine failed.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message)
    }

    /// The JSON body.
    /// 401: no key, or the wrong one.
    pub(crate) fn unauthorised() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "this server needs an API key: send it as `Authorization: Bearer KEY`",
        )
    }

    /// 415: a body that does not say it is JSON.
    pub(crate) fn not_json(content_type: Option<&str>) -> Self {
        let got = content_type.map_or("no Content-Type".to_owned(), |t| format!("Content-Type {t:?}"));
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            Some("unsupported_media_type"),
            format!("request bodies must be JSON with `Content-Type: application/json`, not {got}"),
        )
    }

    /// 403: a Host this server does not answer to (a page whose name resolves to this machine).
    pub(crate) fn foreign_host(host: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            Some("forbidden_host"),
            format!("this server listens on this machine only and does not answer requests for host {host:?}"),
        )
    }

    pub(crate) fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl From<inference_core::Error> for ApiError {
    /// Errors about the request are 400s naming the field; the rest are the server's.
    fn from(err: inference_core::Error) -> Self {
        use inference_core::Error as E;
        match &err {
            E::InvalidSetting { name, .. } => {
                let param = name.split('[').next().unwrap_or(name);
                let param = if param == "stop_strings" { "stop" } else { param };
                Self::invalid(Some(param), "invalid_value", err.report())
            }
            E::EmptyPrompt => Self::invalid(None, "invalid_value", err.report()),
            E::Closed | E::Cancelled => Self::unavailable(err.report()),
            _ => {
                // The details (paths, the backend's messages) go to the log, not to the client.
                tracing::error!(error = %err.report(), "a request failed inside the engine");
                Self::internal("the model failed on this request; the server's log has the details")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_openais_shape() {
        let e = ApiError::model_not_found("gpt-4", "qwen3-tiny");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(
            e.body(),
            json!({"error": {
                "message": "the model \"gpt-4\" does not exist; this server serves \"qwen3-tiny\"",
                "type": "invalid_request_error", "param": "model", "code": "model_not_found"
            }})
        );
    }

    #[test]
    fn core_errors_map_to_statuses() {
        let e = ApiError::from(inference_core::Error::invalid_setting("stop_strings[0]", "\"\"", "must not be empty"));
        assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("stop")));
        let e = ApiError::from(inference_core::Error::invalid_setting("prompt", "9 tokens", "too long"));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert_eq!(ApiError::from(inference_core::Error::EmptyPrompt).status, StatusCode::BAD_REQUEST);
        assert_eq!(ApiError::from(inference_core::Error::Closed).status, StatusCode::SERVICE_UNAVAILABLE);
        let e = ApiError::from(inference_core::Error::backend("metal", "boom in /home/me/models/x/weights.rs"));
        assert_eq!((e.status, e.kind), (StatusCode::INTERNAL_SERVER_ERROR, "server_error"));
        assert!(!e.message.contains("/home/me") && !e.message.contains("boom"), "{}", e.message);
    }
}
