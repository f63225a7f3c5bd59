// SPDX-License-Identifier: EUPL-1.2
//! `mlxr serve`: an OpenAI-compatible HTTP server for one loaded model (and Anthropic's Messages API).
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (whole answers, or
//! server-sent events with `"stream": true`), `POST /v1/messages` (Anthropic's, `anthropic.rs`),
//! `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` and `GET /metrics` (Prometheus's text
//! format, `metrics.rs`); LoRA adapters served beside the model as models of their own, loaded at
//! start or at run time (`POST /v1/adapters`, `DELETE /v1/adapters/{name}`, `adapters.rs`). Every
//! request passes `access.rs` first (the API key, JSON bodies only, a local Host while listening on
//! loopback). Every error is OpenAI's `{"error": {...}}` with a 4xx or 5xx
//! status; an engine failure's details go to the log, not to the client. The
//! address it listens on is printed on standard output as `listening on http://ADDR` once it is
//! ready. Ctrl-C (or SIGTERM) stops accepting, cancels running generations and closes the model.
//! With `--tensor-parallel N` only rank 0 serves (see [`crate::tensor_parallel`]).

mod access;
mod adapters;
mod anthropic;
mod anthropic_tools;
mod api;
mod engine;
mod error;
#[cfg(test)]
mod fuzz_tests;
mod listen;
mod logprobs;
mod metrics;
mod respond;
mod tools;

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
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};

use self::api::{Common, Head, Limits};
use self::engine::{Engine, Prompt, QueueLimits};
use self::error::ApiError;
use self::respond::Kind;
use crate::args::ServeArgs;
use crate::failure::{self, Failure};

/// What every handler shares.
struct AppState {
    engine: Arc<Engine>,
    model_id: String,
    /// The type the model computes in (shown by `/health` and `/metrics`), when the backend says.
    compute_dtype: Option<String>,
    /// How the model writes tool calls (from its chat template).
    tool_call_format: inference_core::ToolCallFormat,
    /// Why the backend chose it.
    compute_dtype_reason: Option<String>,
    created: u64,
    limits: Limits,
    max_body_bytes: usize,
    /// A request body's size and time limits.
    body_limits: listen::BodyLimits,
    connection_limits: listen::ConnectionLimits,
    next_id: AtomicU64,
    access: Arc<access::Access>,
    /// The adapters served beside the model (`adapters.rs`).
    adapters: adapters::Adapters,
}

impl AppState {
    /// A new answer's head, naming the model that gives it.
    fn head(&self, prefix: &str, model: &str) -> Head {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Head { id: format!("{prefix}-{:x}{n:04x}", now.as_nanos()), created: now.as_secs(), model: model.to_owned() }
    }

    /// The model the request's `model` names: the base (also when absent) or an adapter.
    fn choose(&self, common: &Common) -> Result<adapters::Chosen, ApiError> {
        self.adapters.choose(common.model.as_deref())
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
    crate::adapter_arg::at_load(&args.model.adapter, true)?;
    let named: Vec<_> = args.model.adapter.iter().filter(|a| a.name.is_some()).cloned().collect();
    adapters::check_start_names(&named, &model_id).map_err(Failure::new)?;
    if args.tensor_parallel.tensor_parallel > 1 && args.model.adapter.iter().any(|a| a.name.is_some()) {
        return Err(Failure::new("--adapter NAME=DIR cannot serve adapters with --tensor-parallel"));
    }
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
    // The base model takes the adapter to apply at load; the named ones are served beside it.
    let mut base = args.model.clone();
    let named: Vec<_> = base.adapter.iter().filter(|a| a.name.is_some()).cloned().collect();
    base.adapter.retain(|a| a.name.is_none());
    let settings = args.engine_settings(args.tensor_parallel.load_settings(base.load_settings()));
    let model: Arc<dyn inference_core::TextModel> = Arc::from(base.load_with(settings)?);
    let limits = QueueLimits {
        max_concurrent: args.requests_at_once(),
        max_queue: args.max_queue as usize,
        queue_timeout: Duration::from_secs_f64(args.queue_timeout.min(1e9)),
    };
    if !args.no_warmup
        && let Err(e) = warm_up(model.as_ref())
    {
        let _ = model.close();
        return Err(Failure::new(format!("warming the model up: {e}")));
    }
    let engine = Arc::new(Engine::new(Arc::clone(&model), limits).counting_from_now());
    let adapters =
        adapters::Adapters::new(model_id.clone(), Arc::clone(&engine), Arc::clone(&model), args.adapter_root.clone());
    if let Err(e) = adapters::load_at_start(&adapters, &named) {
        adapters.close_all();
        let _ = model.close();
        return Err(Failure::new(e));
    }
    let state = Arc::new(AppState {
        engine: Arc::clone(&engine),
        model_id,
        compute_dtype: model.info().compute_dtype,
        tool_call_format: model.info().tool_call_format,
        compute_dtype_reason: model.info().compute_dtype_reason,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        limits: Limits { max_tokens: args.max_tokens_limit, default_max_tokens: args.default_max_tokens },
        max_body_bytes: args.max_body_bytes,
        body_limits: listen::BodyLimits { max_bytes: args.max_body_bytes, timeout: args.body_timeout },
        connection_limits: listen::ConnectionLimits {
            max_connections: args.max_connections as usize,
            header_timeout: args.header_timeout,
            write_timeout: args.write_timeout,
        },
        next_id: AtomicU64::new(0),
        access: Arc::new(access::Access::new(args.api_key.clone(), args.host)),
        adapters,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the async runtime: {e}")))?;
    let served = runtime.block_on(serve(Arc::clone(&state), SocketAddr::new(args.host, args.port)));
    engine.shut_down();
    // Blocking tasks still finishing a cancelled token exit at their next token.
    runtime.shutdown_timeout(Duration::from_secs(10));
    state.adapters.close_all();
    let closed = model.close();
    served?;
    closed.map_err(Failure::from)
}

/// Generates a few tokens before the server listens, so that what the backend compiles on first use
/// is compiled before the first request. Where the backend has sessions, [`WARM_UP_PROMPTS`] run at
/// once, each in a chat session of its own (its caches stay in the session, so the prompt cache that
/// requests share never sees them): prompts of about 1, 12, 24 and 48 words, so that a prefill of
/// each size class of MLX's quantised matmul tiles runs (on CUDA, `qmm_sm80` for 16, 32 and 64 rows:
/// NVRTC compiles each on first use, tens of seconds with its CUTLASS headers on a machine whose PTX
/// cache is empty, which stalled the first burst of 8 clients for 32-35 s on an H100), and enough of
/// them that a decode step of more than 8 rows (a batch's tiles, and our multi-row kernel's) runs too;
/// then one generation alone, which speculates where the server does.
fn warm_up(model: &dyn inference_core::TextModel) -> Result<(), inference_core::Error> {
    use inference_core::{CancelToken, Error, GenerateSettings};
    let started = Instant::now();
    let settings =
        GenerateSettings { max_tokens: 4, temperature: 0.0, ignore_eos: true, ..GenerateSettings::default() };
    let prompts = warm_up_prompts(model, &settings)?;
    // The first run on a machine can take minutes here (96 s on an H100 whose PTX cache was empty): say why.
    tracing::info!(
        prompts = prompts.len(),
        "warming up: kernels the GPU compiles on first use are compiled now (minutes on a new machine; --no-warmup skips)"
    );
    let mut sessions = Vec::with_capacity(prompts.len());
    for _ in &prompts {
        match model.new_session() {
            Ok(s) => sessions.push(s),
            Err(Error::Unsupported { .. }) => {
                return model.generate(&prompts[0], &settings, CancelToken::new())?.collect_text().map(|_| ());
            }
            Err(e) => return Err(e),
        }
    }
    let mut streams = Vec::with_capacity(prompts.len());
    for (session, prompt) in sessions.iter_mut().zip(&prompts) {
        streams.push(session.generate(prompt, &settings, CancelToken::new())?);
    }
    for stream in streams {
        stream.collect_text()?;
    }
    // Then one generation alone: only a row alone in the batch speculates, so where the server
    // speculates (`--draft-model`, `--prompt-lookup`) this compiles the draft's steps and the
    // verifying pass of several queries (on CUDA our few-query attention kernel) too.
    if let (Some(session), Some(prompt)) = (sessions.first_mut(), prompts.get(1)) {
        let alone = GenerateSettings { max_tokens: 8, ..settings };
        session.generate(prompt, &alone, CancelToken::new())?.collect_text()?;
    }
    // The most rows a step ran: the sessions run as they reach the engine, so a short one may end
    // before the last starts on a slow machine; the log says how many ran together.
    let load = model.engine_load().unwrap_or_default();
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        prompts = prompts.len(),
        peak_batch = load.peak_batch_size,
        speculative_steps = load.speculative_steps,
        "warmed up"
    );
    Ok(())
}

/// How many generations the warm-up runs at once: more than 8, so that a decode step takes the
/// kernels of a batch of 9 or more rows (on CUDA MLX's tensor-core tile, and our multi-row kernel's
/// four-tile variant where `MLXR_CUSTOM_KERNELS=always`), not only those of 2 to 8.
const WARM_UP_PROMPTS: usize = 9;

/// The warm-up's prompts: the first four about 1, 12, 24 and 48 words long (one prefill in each of
/// the quantised matmul's row classes: fewer than 8, up to 16, up to 32, more), the rest short. A
/// prompt the model's context cannot take with the warm-up's tokens (a small test model's) is cut
/// to half its words until it fits.
fn warm_up_prompts(
    model: &dyn inference_core::TextModel,
    settings: &inference_core::GenerateSettings,
) -> Result<Vec<String>, inference_core::Error> {
    use inference_core::{Error, PromptInput};
    let words = |n: usize| {
        let w = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "again"];
        (0..n).map(|i| w[i % w.len()]).collect::<Vec<_>>().join(" ")
    };
    let mut prompts = vec!["Hello".to_owned()];
    for mut n in [12, 24, 48] {
        let fitting = loop {
            let prompt = words(n);
            match model.prepare(PromptInput::Text(&prompt), settings) {
                Ok(_) => break Some(prompt),
                Err(Error::InvalidSetting { .. }) if n > 1 => n /= 2,
                Err(Error::InvalidSetting { .. }) => break None,
                Err(e) => return Err(e),
            }
        };
        prompts.extend(fitting);
    }
    while prompts.len() < WARM_UP_PROMPTS {
        prompts.push(format!("Hello number {}", prompts.len()));
    }
    Ok(prompts)
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
        .route("/v1/messages", post(messages))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/adapters", post(adapters::load_route).get(adapters::list_route))
        .route("/v1/adapters/{name}", delete(adapters::unload_route))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.body_limits, listen::read_body))
        .layer(middleware::from_fn_with_state(Arc::clone(&state.access), access::guard))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), log_request))
        .with_state(state)
}

async fn serve(state: Arc<AppState>, addr: SocketAddr) -> Result<(), Failure> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| Failure::new(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| failure::io("reading the bound address", e))?;
    // Registered before the address is printed: a signal sent as soon as a client reads it
    // stops the server cleanly instead of killing it.
    let shutdown = Shutdown::register();
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{bound}")
            .and_then(|()| out.flush())
            .map_err(|e| failure::io("writing to standard output", e))?;
    }
    tracing::info!(address = %bound, model = %state.model_id, "serving");
    if state.access.open_to_the_network() {
        tracing::warn!(
            address = %bound,
            "listening beyond this machine without an API key: anyone who can reach it can use the model (set --api-key \
             or MLXR_API_KEY)"
        );
    }
    let engine = Arc::clone(&state.engine);
    let died = Arc::new(std::sync::Mutex::new(None));
    let death = Arc::clone(&died);
    let limits = state.connection_limits;
    let stop = async move {
        tokio::select! {
            () = shutdown.wait() => tracing::info!("shutting down"),
            why = model_died(Arc::clone(&engine)) => {
                tracing::error!(error = %why, "the model can no longer serve; shutting down");
                *death.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
            }
        }
        engine.shut_down();
    };
    listen::serve(listener, router(state), limits, stop).await;
    // A supervisor restarts a server that exits with an error.
    match died.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        Some(why) => Err(Failure::new(format!("the model can no longer serve: {why}"))),
        None => Ok(()),
    }
}

/// Ctrl-C and SIGTERM, listened for from the moment this is made.
struct Shutdown {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Shutdown {
    fn register() -> Shutdown {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Shutdown {
                interrupt: signal(SignalKind::interrupt()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        Shutdown {}
    }

    /// Until the first signal.
    async fn wait(self) {
        #[cfg(unix)]
        {
            async fn next(s: Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = next(self.interrupt) => {}
                () = next(self.terminate) => {}
            }
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn log_request(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    state.engine.metrics.responded(response.status().as_u16());
    tracing::info!(%method, %path, status = response.status().as_u16(), ms = started.elapsed().as_millis() as u64, "request");
    response
}

async fn no_route(request: Request) -> ApiError {
    ApiError::no_route(request.method().as_str(), request.uri().path())
}

/// 200 while the model can serve; 503 with the reason once it cannot (the server is stopping).
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let (status, code, error) = match state.engine.health() {
        Ok(()) => (StatusCode::OK, "ok", None),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, "failed", Some(e.to_string())),
    };
    let mut body = json!({
        "status": code,
        "model": state.model_id,
        "compute_dtype": state.compute_dtype,
        "compute_dtype_reason": state.compute_dtype_reason,
        "engine": state.engine.json(),
        "adapters": state.adapters.health(),
    });
    if let Some(error) = error {
        body["error"] = json!(error);
    }
    (status, Json(body)).into_response()
}

/// Resolves with the reason once the model can no longer serve (its engine or its bridge
/// process died): looked at every second.
async fn model_died(engine: Arc<Engine>) -> String {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        if let Err(e) = engine.health() {
            return e.report();
        }
    }
}

async fn prometheus(State(state): State<Arc<AppState>>) -> Response {
    let engine = &state.engine;
    let model = metrics::ModelLabels {
        id: &state.model_id,
        compute_dtype: state.compute_dtype.as_deref(),
        compute_dtype_reason: state.compute_dtype_reason.as_deref(),
    };
    let mut text = metrics::render(&engine.metrics, &engine.stats.counters(), engine.load().as_ref(), &model);
    text.push_str(&state.adapters.metrics());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

fn model_object(state: &AppState) -> Value {
    json!({ "id": state.model_id, "object": "model", "created": state.created, "owned_by": "mlxr" })
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": state.adapters.model_objects(model_object(&state)) }))
}

async fn get_model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if id == state.model_id {
        return Ok(Json(model_object(&state)));
    }
    state.adapters.model_object(&id).map(Json).ok_or_else(|| ApiError::model_not_found(&id, &state.model_id))
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
    /// How many choices (`n`).
    choices: usize,
    /// The format to read tool calls in, when the request offers tools.
    calls: Option<inference_core::ToolCallFormat>,
    /// The model it names.
    chosen: adapters::Chosen,
}

impl<T> Parsed<T> {
    /// The request without its endpoint's own fields (once they are read).
    fn without_own(self) -> Parsed<()> {
        Parsed {
            own: (),
            common: self.common,
            settings: self.settings,
            choices: self.choices,
            calls: self.calls,
            chosen: self.chosen,
        }
    }
}

fn parse_request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Parsed<T>, ApiError> {
    let body = body_of(state, body)?;
    let (own, value) = api::parse::<T>(&body)?;
    let common: Common = api::from_value(&value)?;
    let chosen = state.choose(&common)?;
    let sampling: api::Sampling = api::from_value(&value)?;
    let fields: tools::ToolFields = api::from_value(&value)?;
    let settings = fields.apply(sampling.settings(state.limits)?)?;
    settings.validate()?;
    let calls = tools::call_format(&settings, state.tool_call_format);
    Ok(Parsed { own, common, settings, choices: sampling.choices()?, calls, chosen })
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: Parsed<api::ChatRequest> = parse_request(&state, body)?;
    let prompt = Prompt::Chat(request.own.messages()?);
    let kind = Kind::Chat(request.calls);
    respond(&state, request.without_own(), prompt, "chatcmpl", kind).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut request: Parsed<api::CompletionRequest> = parse_request(&state, body)?;
    // Tools are for chats: a plain completion is not given them.
    request.settings.tools.clear();
    request.settings.tool_choice = inference_core::ToolChoice::Auto;
    let prompt = Prompt::Text(request.own.prompt()?);
    respond(&state, request.without_own(), prompt, "cmpl", Kind::Text).await
}

/// Anthropic's Messages API (see `anthropic.rs`).
async fn messages(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, anthropic::AnthropicError> {
    let body = body_of(&state, body)?;
    let (request, _) = api::parse::<anthropic::MessagesRequest>(&body)?;
    let chosen = state.choose(&Common { model: request.model.clone(), ..Common::default() })?;
    let conversation = request.messages()?;
    let settings = request.settings(state.limits)?;
    let format = tools::call_format(&settings, state.tool_call_format);
    let stops = settings.stop_strings.clone();
    let generation = chosen.engine.start(Prompt::Chat(conversation), settings).await?;
    let head = state.head("msg", &chosen.id);
    if request.stream {
        return Ok(respond::anthropic_stream(generation, head, format, stops));
    }
    let (text, _, outcome) = respond::collect(generation).await?;
    let (content, tool_use) = anthropic_tools::content(format, &text);
    let stop_sequence = outcome.stop_string.and_then(|i| stops.get(i)).map(String::as_str);
    let end = anthropic::Ending { finish: outcome.finish_reason, tool_use, stop_sequence };
    let tokens = (outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens);
    Ok(Json(anthropic::message(&head, content, end, tokens)).into_response())
}

/// Starts `n` choices of `prompt` and answers with a stream of `kind` chunks or, when the request
/// does not stream, with the whole completion. New ids start with `id_prefix`.
async fn respond(
    state: &AppState,
    request: Parsed<()>,
    prompt: Prompt,
    id_prefix: &str,
    kind: Kind,
) -> Result<Response, ApiError> {
    let generations = respond::start(&request.chosen.engine, &prompt, &request.settings, request.choices).await?;
    let head = state.head(id_prefix, &request.chosen.id);
    if request.common.streaming() {
        return Ok(respond::stream(generations, head, kind, request.common.include_usage()));
    }
    respond::whole(generations, &head, kind).await
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
