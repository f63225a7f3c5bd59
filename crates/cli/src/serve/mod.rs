// SPDX-License-Identifier: EUPL-1.2
//! `mlxr serve`: an OpenAI-compatible HTTP server for one loaded model.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (whole answers, or
//! server-sent events with `"stream": true`), `GET /v1/models`, `GET /v1/models/{id}` and
//! `GET /health`. Every error is OpenAI's `{"error": {...}}` with a 4xx or 5xx status. The
//! address it listens on is printed on standard output as `listening on http://ADDR` once it is
//! ready. Ctrl-C (or SIGTERM) stops accepting, cancels running generations and closes the model.
//! With `--tensor-parallel N` only rank 0 serves (see [`crate::tensor_parallel`]).

mod api;
mod engine;
mod error;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use self::api::{Common, Head, Limits};
use self::engine::{Engine, Event, Generation, Outcome, Prompt, QueueLimits};
use self::error::ApiError;
use crate::args::ServeArgs;
use crate::failure::{self, Failure};

/// What every handler shares.
struct AppState {
    engine: Arc<Engine>,
    model_id: String,
    /// The type the model computes in (shown by `/health`), when the backend says.
    compute_dtype: Option<String>,
    created: u64,
    limits: Limits,
    max_body_bytes: usize,
    next_id: AtomicU64,
}

impl AppState {
    fn head(&self, prefix: &str) -> Head {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Head {
            id: format!("{prefix}-{:x}{n:04x}", now.as_nanos()),
            created: now.as_secs(),
            model: self.model_id.clone(),
        }
    }

    /// The request's `model` must be the one served (or absent).
    fn check_model(&self, common: &Common) -> Result<(), ApiError> {
        match common.model.as_deref() {
            None => Ok(()),
            Some(m) if m == self.model_id => Ok(()),
            Some(m) => Err(ApiError::model_not_found(m, &self.model_id)),
        }
    }
}

pub(crate) fn run(args: &ServeArgs) -> Result<(), Failure> {
    if args.queue_timeout.is_nan() || args.queue_timeout < 0.0 {
        return Err(Failure::new(format!("--queue-timeout {}: must be a number of seconds >= 0", args.queue_timeout)));
    }
    if args.max_tokens_limit == 0 || args.default_max_tokens == 0 {
        return Err(Failure::new("--max-tokens-limit and --default-max-tokens must be at least 1"));
    }
    let model_id = match &args.model_id {
        Some(id) if !id.is_empty() => id.clone(),
        Some(_) => return Err(Failure::new("--model-id must not be empty")),
        None => model_id_of(&args.model.model),
    };
    crate::tensor_parallel::run(
        &args.tensor_parallel,
        &args.model,
        Vec::new(),
        crate::tensor_parallel::Terminal::Batch,
        || serve_model(args, model_id),
    )
}

/// Loads the model (this process's shard with `--tensor-parallel`) and serves it.
fn serve_model(args: &ServeArgs, model_id: String) -> Result<(), Failure> {
    let settings = args.engine_settings(args.tensor_parallel.load_settings(args.model.load_settings()));
    let model: Arc<dyn inference_core::TextModel> = Arc::from(args.model.load_with(settings)?);
    let limits = QueueLimits {
        max_concurrent: args.requests_at_once(),
        max_queue: args.max_queue as usize,
        queue_timeout: Duration::from_secs_f64(args.queue_timeout.min(1e9)),
    };
    let engine = Arc::new(Engine::new(Arc::clone(&model), limits));
    let state = Arc::new(AppState {
        engine: Arc::clone(&engine),
        model_id,
        compute_dtype: model.info().compute_dtype,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        limits: Limits { max_tokens: args.max_tokens_limit, default_max_tokens: args.default_max_tokens },
        max_body_bytes: args.max_body_bytes,
        next_id: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the async runtime: {e}")))?;
    let served = runtime.block_on(serve(state, SocketAddr::new(args.host, args.port)));
    engine.shut_down();
    // Blocking tasks still finishing a cancelled token exit at their next token.
    runtime.shutdown_timeout(Duration::from_secs(10));
    let closed = model.close();
    served?;
    closed.map_err(Failure::from)
}

/// The directory's name, the id OpenAI clients send back in `model`.
fn model_id_of(path: &std::path::Path) -> String {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    canonical.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_owned())
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

async fn serve(state: Arc<AppState>, addr: SocketAddr) -> Result<(), Failure> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| Failure::new(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| failure::io("reading the bound address", e))?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{bound}")
            .and_then(|()| out.flush())
            .map_err(|e| failure::io("writing to standard output", e))?;
    }
    tracing::info!(address = %bound, model = %state.model_id, "serving");
    let engine = Arc::clone(&state.engine);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            engine.shut_down();
        })
        .await
        .map_err(|e| Failure::new(format!("the server failed: {e}")))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn log_request(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::info!(%method, %path, status = response.status().as_u16(), ms = started.elapsed().as_millis() as u64, "request");
    response
}

async fn no_route(request: Request) -> ApiError {
    ApiError::no_route(request.method().as_str(), request.uri().path())
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": state.model_id,
        "compute_dtype": state.compute_dtype,
        "engine": state.engine.json(),
    }))
}

fn model_object(state: &AppState) -> Value {
    json!({ "id": state.model_id, "object": "model", "created": state.created, "owned_by": "mlxr" })
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_object(&state)] }))
}

async fn get_model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if id == state.model_id {
        Ok(Json(model_object(&state)))
    } else {
        Err(ApiError::model_not_found(&id, &state.model_id))
    }
}

/// The body, or the error for a body over the limit or unreadable.
fn body_of(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.max_body_bytes)
        } else {
            ApiError::invalid(None, "invalid_body", format!("cannot read the request body: {}", rejection.body_text()))
        }
    })
}

/// What both endpoints read from a request.
struct Parsed<T> {
    own: T,
    common: Common,
    settings: inference_core::GenerateSettings,
}

fn parse_request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Parsed<T>, ApiError> {
    let body = body_of(state, body)?;
    let (own, value) = api::parse::<T>(&body)?;
    let common: Common = api::from_value(&value)?;
    state.check_model(&common)?;
    let sampling: api::Sampling = api::from_value(&value)?;
    let settings = sampling.settings(state.limits)?;
    Ok(Parsed { own, common, settings })
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: Parsed<api::ChatRequest> = parse_request(&state, body)?;
    let messages = request.own.messages()?;
    let prompt = Prompt::Chat(messages);
    respond(&state, &request.common, prompt, request.settings, "chatcmpl", Kind::Chat, |head, text, finish, usage| {
        api::chat_completion(head, text, finish, usage)
    })
    .await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: Parsed<api::CompletionRequest> = parse_request(&state, body)?;
    let prompt = Prompt::Text(request.own.prompt()?);
    respond(&state, &request.common, prompt, request.settings, "cmpl", Kind::Text, |head, text, finish, usage| {
        api::text_completion(head, Some(text), Some(finish), Some(usage))
    })
    .await
}

/// Starts `prompt` and answers with a stream of `kind` chunks or, when the request does not
/// stream, with the whole completion that `whole` makes of the head, the text, the finish reason
/// and the usage. New ids start with `id_prefix`.
async fn respond(
    state: &AppState,
    common: &Common,
    prompt: Prompt,
    settings: inference_core::GenerateSettings,
    id_prefix: &str,
    kind: Kind,
    whole: impl FnOnce(&api::Head, &str, &str, Value) -> Value,
) -> Result<Response, ApiError> {
    let generation = state.engine.start(prompt, settings).await?;
    let head = state.head(id_prefix);
    if common.streaming() {
        Ok(stream_response(generation, head, kind, common.include_usage()))
    } else {
        let (text, outcome) = collect(generation).await?;
        let usage = api::usage(outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens);
        Ok(Json(whole(&head, &text, outcome.finish_reason, usage)).into_response())
    }
}

/// Reads a generation to the end.
async fn collect(mut generation: Generation) -> Result<(String, Outcome), ApiError> {
    let mut text = String::new();
    loop {
        match generation.next().await {
            Some(Event::Token(t)) => text.push_str(&t),
            Some(Event::Done(outcome)) => return Ok((text, outcome)),
            Some(Event::Failed(e)) => return Err(e.into()),
            None => return Err(ApiError::unavailable("the generation was cancelled: the server is shutting down")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

/// The generation as server-sent events, ending with `data: [DONE]`. The events are made by a
/// task that owns the generation; when the client goes away, axum drops the receiving end, the
/// task's next send fails, and dropping the generation cancels the engine's work.
fn stream_response(mut generation: Generation, head: Head, kind: Kind, include_usage: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(16);
    tokio::spawn(async move {
        let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
        let usage_field = |u: Value| if include_usage { Some(u) } else { None };
        let first = match kind {
            Kind::Chat => Some(api::chat_chunk(&head, Some(json!({"role": "assistant", "content": ""})), None, None)),
            Kind::Text => None,
        };
        if let Some(first) = first
            && tx.send(data(first)).await.is_err()
        {
            return;
        }
        loop {
            let event = tokio::select! {
                event = generation.next() => event,
                () = tx.closed() => return,
            };
            let chunks = match event {
                Some(Event::Token(text)) => vec![match kind {
                    Kind::Chat => api::chat_chunk(&head, Some(json!({ "content": text })), None, None),
                    Kind::Text => api::text_completion(&head, Some(&text), None, None),
                }],
                Some(Event::Done(outcome)) => {
                    let finish = Some(outcome.finish_reason);
                    let mut chunks = vec![match kind {
                        Kind::Chat => api::chat_chunk(&head, Some(json!({})), finish, None),
                        Kind::Text => api::text_completion(&head, Some(""), finish, None),
                    }];
                    if let Some(usage) =
                        usage_field(api::usage(outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens))
                    {
                        chunks.push(match kind {
                            Kind::Chat => api::chat_chunk(&head, None, None, Some(usage)),
                            Kind::Text => api::text_completion(&head, None, None, Some(usage)),
                        });
                    }
                    for chunk in chunks {
                        if tx.send(data(chunk)).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                Some(Event::Failed(e)) => {
                    let _ = tx.send(data(ApiError::from(e).body())).await;
                    return;
                }
                None => {
                    let _ = tx.send(data(ApiError::unavailable("the server is shutting down").body())).await;
                    return;
                }
            };
            for chunk in chunks {
                if tx.send(data(chunk)).await.is_err() {
                    return;
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_id_is_the_directory_name() {
        assert_eq!(model_id_of(std::path::Path::new("/no/such/dir/qwen3-tiny")), "qwen3-tiny");
        assert_eq!(model_id_of(std::path::Path::new("/")), "model");
    }
}
