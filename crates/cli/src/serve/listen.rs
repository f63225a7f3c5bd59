// SPDX-License-Identifier: EUPL-1.2
//! Accepting connections with limits a hostile client cannot get round: at most
//! `--max-connections` open at once (one more is answered 503 and closed), a request's head must
//! arrive within `--header-timeout` (which is also how long a kept-alive connection may sit idle
//! between requests), its body within `--body-timeout` (408, in [`read_body`]), and a client that
//! stops reading its answer for `--write-timeout` loses the connection ([`TimedWrites`]), which
//! drops the answer and so cancels its generation.
//!
//! HTTP/1.1 over hyper, the router being axum's. At shutdown the listener closes, every
//! connection is asked to finish its request in flight and close, and those still open after
//! [`DRAIN`] are dropped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::error::ApiError;

/// How long connections get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// The limits on connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub(crate) max_connections: usize,
    pub(crate) header_timeout: Duration,
    /// How long a write may wait for a client that does not read.
    pub(crate) write_timeout: Duration,
}

/// The limits on a request's body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    pub(crate) max_bytes: usize,
    pub(crate) timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.max_connections, "too many connections: refused");
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let io = TokioIo::new(TimedWrites::new(stream, limits.write_timeout));
        let connection = builder.serve_connection(io, service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!(seconds = DRAIN.as_secs(), "connections still open after shutdown were dropped");
    }
}

/// Answers a connection over the limit with 503 and closes it (within a second: a client that
/// does not read loses the answer, not the server's time).
async fn refuse(mut stream: TcpStream, limit: usize) {
    let body = ApiError::unavailable(format!("the server has {limit} connections open, its limit; try again later"))
        .body()
        .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Middleware: reads a POST's whole body, at most `max_bytes` (413) within `timeout` (408),
/// before any handler runs, so that a client trickling its body holds nothing but its
/// connection.
pub(crate) async fn read_body(State(limits): State<BodyLimits>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, limits.max_bytes)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return body_error(&e, limits.max_bytes).into_response(),
        Err(_) => return ApiError::body_timeout(limits.timeout).into_response(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// The error for a body that could not be read: over the limit, or broken off.
fn body_error(e: &axum::Error, max_bytes: usize) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return ApiError::too_large(max_bytes);
        }
        source = s.source();
    }
    ApiError::invalid(None, "invalid_body", format!("cannot read the request body: {e}"))
}

/// A stream whose writes fail with `TimedOut` once one has waited `limit` for the other side to
/// read (reads are not limited here: hyper's header timeout and [`read_body`] do that).
pub(crate) struct TimedWrites<S> {
    inner: S,
    limit: Duration,
    /// Running while a write waits.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> TimedWrites<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        TimedWrites { inner, limit, waiting: None }
    }

    /// What a write that returned `poll` means: ready resets the clock, pending starts it (and
    /// fails once it has run out).
    fn timed<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.waiting = None;
            return poll;
        }
        let limit = self.limit;
        let clock = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(clock.as_mut().poll(cx));
        self.waiting = None;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {} s", limit.as_secs_f64()),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedWrites<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedWrites<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.timed(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.timed(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.timed(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.timed(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_too_long_fails_and_one_that_moves_does_not() {
        // A pipe with room for 8 bytes whose other end nobody reads.
        let (near, mut far) = tokio::io::duplex(8);
        let mut timed = TimedWrites::new(near, Duration::from_secs(5));
        timed.write_all(b"12345678").await.unwrap();
        let err = timed.write_all(b"9").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "the client read nothing for 5 s");
        // Once the other side reads, writes go through again.
        let mut got = [0u8; 8];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut got).await.unwrap();
        timed.write_all(b"abc").await.unwrap();
    }
}
