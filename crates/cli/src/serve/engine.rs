// SPDX-License-Identifier: EUPL-1.2
//! The queue in front of the model, and the bridge from its blocking token stream to async code.
//!
//! A request first takes one of `--max-concurrent` permits per choice, all at once; while they
//! are not free it waits, up to `--max-queue` requests and `--queue-timeout`. With a permit, a
//! blocking task calls the model and forwards each token over a bounded channel. The
//! [`Generation`] that the handler holds cancels the call when it is dropped, so a client that
//! disconnects (axum drops the response body, and with it the generation) stops the engine at
//! its next token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use inference_core::{CancelToken, Error, GenerateSettings, Message, PreparedPrompt, PromptInput, TextModel};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::error::ApiError;

/// What to generate from.
#[derive(Debug, Clone)]
pub(crate) enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Raw text, continued as it stands.
    Text(String),
}

/// A request made ready to queue: tokenised and checked by the model when it can
/// ([`TextModel::prepare`]), else the prompt as it came.
#[derive(Debug, Clone)]
pub(crate) enum Ready {
    Prepared(PreparedPrompt),
    Raw(Prompt, GenerateSettings),
}

impl Ready {
    fn settings(&self) -> &GenerateSettings {
        match self {
            Ready::Prepared(p) => &p.settings,
            Ready::Raw(_, s) => s,
        }
    }

    /// The same prompt with another seed (one per choice).
    pub(crate) fn with_seed(mut self, seed: Option<u64>) -> Ready {
        match &mut self {
            Ready::Prepared(p) => p.settings.seed = seed,
            Ready::Raw(_, s) => s.seed = seed,
        }
        self
    }
}

/// What a generation sends to its handler.
#[derive(Debug)]
pub(crate) enum Event {
    /// The next token (its text, and its scores when asked for).
    Token(inference_core::Token),
    /// The end.
    Done(Outcome),
    /// The engine failed part-way (the last event).
    Failed(Error),
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) prompt_tokens: usize,
    /// Prompt tokens served from the prompt cache.
    pub(crate) cached_tokens: usize,
    pub(crate) completion_tokens: usize,
    /// `"length"` when it stopped at max_tokens or the end of the context, else `"stop"`.
    pub(crate) finish_reason: &'static str,
    /// Which of the request's stop strings ended it (an index), when the backend says.
    pub(crate) stop_string: Option<usize>,
    /// Speculative decoding: tokens guessed and checked, and those accepted.
    pub(crate) draft_tokens: usize,
    pub(crate) accepted_draft_tokens: usize,
}

/// Counters shown by `/health`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    queued: AtomicUsize,
    running: AtomicUsize,
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    generated_tokens: AtomicU64,
    cancelled_tokens: AtomicU64,
}

impl Stats {
    /// A snapshot for `/metrics`.
    pub(crate) fn counters(&self) -> super::metrics::Counters {
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        super::metrics::Counters {
            queued: self.queued.load(Ordering::SeqCst),
            running: self.running.load(Ordering::SeqCst),
            completed: get(&self.completed),
            cancelled: get(&self.cancelled),
            failed: get(&self.failed),
            generated_tokens: get(&self.generated_tokens),
        }
    }

    pub(crate) fn json(&self) -> Value {
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        json!({
            "queued": self.queued.load(Ordering::SeqCst),
            "running": self.running.load(Ordering::SeqCst),
            "completed": get(&self.completed),
            "cancelled": get(&self.cancelled),
            "failed": get(&self.failed),
            "generated_tokens": get(&self.generated_tokens),
            "cancelled_generation_tokens": get(&self.cancelled_tokens),
        })
    }
}

/// Decrements a counter when dropped.
struct Count<'a>(&'a AtomicUsize);

impl<'a> Count<'a> {
    fn up(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The queue's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub(crate) max_concurrent: usize,
    pub(crate) max_queue: usize,
    pub(crate) queue_timeout: Duration,
}

/// The loaded model behind its queue.
pub(crate) struct Engine {
    model: Arc<dyn TextModel>,
    permits: Arc<Semaphore>,
    /// Turns to tokenise a prompt before it queues (one per core: a flood of huge prompts waits
    /// here instead of taking memory and generation slots).
    intake: Arc<Semaphore>,
    limits: QueueLimits,
    /// The parent of every generation's token: cancelled at shutdown.
    shutdown: CancelToken,
    /// Shared with the engines of the adapters served beside the model ([`Engine::for_model`]).
    pub(crate) stats: Arc<Stats>,
    pub(crate) metrics: Arc<super::metrics::Metrics>,
    /// The model's engine counters when the server started serving (after its warm-up), which
    /// [`Engine::load`] subtracts.
    baseline: Option<inference_core::EngineLoad>,
}

/// A running generation. Dropping it cancels the engine's work.
pub(crate) struct Generation {
    events: mpsc::Receiver<Event>,
    cancel: CancelToken,
}

impl Generation {
    /// The next event; `None` when the engine stopped without finishing (a shutdown).
    pub(crate) async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Engine {
    pub(crate) fn new(model: Arc<dyn TextModel>, limits: QueueLimits) -> Self {
        Self {
            model,
            permits: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            intake: Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(2, usize::from))),
            limits,
            shutdown: CancelToken::new(),
            stats: Arc::default(),
            metrics: Arc::default(),
            baseline: None,
        }
    }

    /// Counts the engine's work from now on only (after the server's warm-up).
    pub(crate) fn counting_from_now(mut self) -> Self {
        self.baseline = self.model.engine_load();
        self
    }

    /// An engine for `model` (an adapter served beside this one) that shares this one's queue,
    /// counters and shutdown.
    pub(crate) fn for_model(&self, model: Arc<dyn TextModel>) -> Engine {
        Engine {
            model,
            permits: Arc::clone(&self.permits),
            intake: Arc::clone(&self.intake),
            limits: self.limits,
            shutdown: self.shutdown.clone(),
            stats: Arc::clone(&self.stats),
            metrics: Arc::clone(&self.metrics),
            baseline: None,
        }
    }

    /// What the model's engine is doing now, when the backend batches.
    pub(crate) fn load(&self) -> Option<inference_core::EngineLoad> {
        let now = self.model.engine_load()?;
        Some(match &self.baseline {
            Some(earlier) => now.since(earlier),
            None => now,
        })
    }

    /// The counters and, when the backend batches, what its engine is doing now.
    pub(crate) fn json(&self) -> Value {
        let mut stats = self.stats.json();
        if let Some(load) = self.load() {
            stats["batch"] = json!(load);
        }
        stats
    }

    /// Whether the model can still serve (see [`TextModel::health`]).
    pub(crate) fn health(&self) -> Result<(), Error> {
        self.model.health()
    }

    /// Cancels every generation and refuses new ones.
    pub(crate) fn shut_down(&self) {
        self.shutdown.cancel();
        self.permits.close();
    }

    /// Waits for `n` permits (a request's choices), taken together: at once when they are free,
    /// else in the queue. A request holds all of its permits or none, so that requests with
    /// several choices cannot each hold some and wait for the others' (a deadlock until the
    /// queue timeout: a choice that was admitted alone stops once its channel is full, because
    /// its answer is sent only when every choice has started).
    async fn admit(&self, n: usize) -> Result<OwnedSemaphorePermit, ApiError> {
        let closed = || ApiError::unavailable("the server is shutting down");
        let most = self.limits.max_concurrent.max(1);
        if n > most {
            return Err(ApiError::invalid(
                Some("n"),
                "invalid_value",
                format!("n = {n} is more than the {most} generations this server runs at once (--max-concurrent)"),
            ));
        }
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        match Arc::clone(&self.permits).try_acquire_many_owned(n) {
            Ok(permit) => return Ok(permit),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(closed()),
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        let queued = self.stats.queued.load(Ordering::SeqCst);
        if queued >= self.limits.max_queue {
            return Err(ApiError::queue_full(queued));
        }
        let _waiting = Count::up(&self.stats.queued);
        match tokio::time::timeout(self.limits.queue_timeout, Arc::clone(&self.permits).acquire_many_owned(n)).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(ApiError::unavailable(format!(
                "the server is busy: no turn came within {} s; try again later",
                self.limits.queue_timeout.as_secs_f64()
            ))),
        }
    }

    /// Tokenises and checks the prompt (a turn of `intake`, not a generation slot): a prompt
    /// that cannot run is refused before it queues.
    pub(crate) async fn prepare(&self, prompt: Prompt, settings: GenerateSettings) -> Result<Ready, ApiError> {
        let closed = || ApiError::unavailable("the server is shutting down");
        let turn = Arc::clone(&self.intake).acquire_owned().await.map_err(|_| closed())?;
        let model = Arc::clone(&self.model);
        let prepared = tokio::task::spawn_blocking(move || {
            let input = match &prompt {
                Prompt::Chat(messages) => PromptInput::Chat(messages),
                Prompt::Text(text) => PromptInput::Text(text),
            };
            let prepared = model.prepare(input, &settings);
            drop(turn);
            prepared.map(|p| p.map_or(Ready::Raw(prompt, settings), Ready::Prepared))
        })
        .await
        .map_err(|e| ApiError::internal(format!("preparing the prompt failed: {e}")))?;
        prepared.map_err(ApiError::from)
    }

    /// Prepares, queues and starts the request (see [`Engine::start_ready`]).
    pub(crate) async fn start(
        self: &Arc<Self>,
        prompt: Prompt,
        settings: GenerateSettings,
    ) -> Result<Generation, ApiError> {
        let ready = self.prepare(prompt, settings).await?;
        let mut started = self.start_ready(vec![ready]).await?;
        started.pop().ok_or_else(|| ApiError::internal("no generation started"))
    }

    /// Queues a prepared request's choices (one generation each, their turns taken together),
    /// starts them, and returns once the model has accepted them (errors about the prompt or
    /// settings come back here, before any token).
    pub(crate) async fn start_ready(self: &Arc<Self>, choices: Vec<Ready>) -> Result<Vec<Generation>, ApiError> {
        let arrived = Instant::now();
        let mut permits = self.admit(choices.len()).await?;
        let mut generations = Vec::with_capacity(choices.len());
        for ready in choices {
            let permit = permits.split(1).ok_or_else(|| ApiError::internal("a choice without its turn"))?;
            generations.push(self.launch(ready, permit, arrived).await?);
        }
        Ok(generations)
    }

    /// Starts one generation on its permit.
    async fn launch(
        self: &Arc<Self>,
        ready: Ready,
        permit: OwnedSemaphorePermit,
        arrived: Instant,
    ) -> Result<Generation, ApiError> {
        let cancel = self.shutdown.child();
        let (started_tx, started_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(32);
        let engine = Arc::clone(self);
        let token = cancel.clone();
        // Dropped before the model has answered (the client went away): cancel the call.
        let generation = Generation { events: rx, cancel };
        tokio::task::spawn_blocking(move || {
            engine.produce(ready, token, started_tx, &tx, arrived);
            drop(permit);
        });
        match started_rx.await {
            Ok(Ok(())) => Ok(generation),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ApiError::internal("the engine stopped before starting the generation")),
        }
    }

    /// Runs on a blocking thread: calls the model and forwards its tokens.
    fn produce(
        &self,
        ready: Ready,
        cancel: CancelToken,
        started: oneshot::Sender<Result<(), Error>>,
        tx: &mpsc::Sender<Event>,
        arrived: Instant,
    ) {
        let stream = match &ready {
            Ready::Prepared(prepared) => self.model.generate_prepared(prepared, cancel),
            Ready::Raw(Prompt::Chat(messages), settings) => self.model.chat(messages, settings, cancel),
            Ready::Raw(Prompt::Text(text), settings) => self.model.generate(text, settings, cancel),
        };
        let settings = ready.settings();
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        let _running = Count::up(&self.stats.running);
        if started.send(Ok(())).is_err() {
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let mut generated = 0usize;
        let (mut cancelled, mut counted) = (false, false);
        let mut last = arrived;
        loop {
            match stream.next() {
                Some(Ok(token)) => {
                    let now = Instant::now();
                    let histogram =
                        if generated == 0 { &self.metrics.time_to_first_token } else { &self.metrics.inter_token };
                    histogram.observe((now - last).as_secs_f64());
                    last = now;
                    generated += 1;
                    if tx.blocking_send(Event::Token(token)).is_err() {
                        cancelled = true;
                        break;
                    }
                }
                Some(Err(e)) if e.is_cancelled() => {
                    cancelled = true;
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e.report(), "generation failed");
                    self.stats.failed.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.blocking_send(Event::Failed(e));
                    break;
                }
                None => {
                    let metrics = stream.metrics().copied().unwrap_or_default();
                    let (prompt_tokens, cached_tokens) = (metrics.prompt_tokens, metrics.cached_prompt_tokens);
                    // A backend that does not say: `max_tokens` reached is the only length it knows of.
                    let finish_reason = metrics.finish_reason.map_or(
                        if generated >= settings.max_tokens { "length" } else { "stop" },
                        inference_core::FinishReason::openai,
                    );
                    let stop_string = metrics.stop_string;
                    let completion_tokens = generated;
                    let outcome = Outcome {
                        prompt_tokens,
                        cached_tokens,
                        completion_tokens,
                        finish_reason,
                        stop_string,
                        draft_tokens: metrics.draft_tokens,
                        accepted_draft_tokens: metrics.accepted_draft_tokens,
                    };
                    self.metrics.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
                    self.metrics.cached_prompt_tokens.fetch_add(cached_tokens as u64, Ordering::Relaxed);
                    // Counted before the client hears of the end, so that what it asks next sees it.
                    self.stats.generated_tokens.fetch_add(generated as u64, Ordering::SeqCst);
                    counted = true;
                    self.stats.completed.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.blocking_send(Event::Done(outcome));
                    break;
                }
            }
        }
        // Stop the backend before the permit goes to the next request.
        drop(stream);
        if !counted {
            self.stats.generated_tokens.fetch_add(generated as u64, Ordering::SeqCst);
        }
        if cancelled {
            tracing::info!(generated, "generation cancelled");
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            self.stats.cancelled_tokens.fetch_add(generated as u64, Ordering::SeqCst);
        }
    }
}
