// SPDX-License-Identifier: EUPL-1.2
//! The `"metal"` backend of inference-core: models on their own engine
//! thread, reached through a `Send + Sync` handle.
//!
//! MLX arrays must be evaluated on the thread that made them, so each loaded
//! model lives on one engine thread (an actor) for its whole life. The public
//! [`MetalModel`] sends it jobs over a channel; token streams come back over
//! inference-core's [`TokenStream`]. Dropping a stream, or cancelling its
//! token, stops generation before the next token. Calls on one model run one
//! after another; different models run in parallel on their own threads.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use inference_core::{
    AttentionInspector, AttentionSnapshot, Backend, BatchResult, CancelToken, ChatSession, ClassifyResult,
    Error as CoreError, GenerateMetrics, GenerateSettings, LoadSettings, LogitsMode, Message, ModelInfo,
    Result as CoreResult, TextModel, Token, TokenSink, TokenStream,
};

mod mirror;

use self::mirror::{Mirror, Request};
use crate::array::Array;
use crate::batch;
use crate::cache::LayerCache;
use crate::chat::ChatTemplate;
use crate::device::{Device, DeviceScope};
use crate::error::Error;
use crate::generate::{self, GenerationStats, LoopOptions, Step};
use crate::model::{self, Description, LoadedModel};
use crate::ops;
use crate::sample::{Sampler, SamplerConfig};
use crate::session::{Fingerprint, SessionCache};
use crate::tokenizer::{StopMatcher, StreamDecoder, Tokenizer};

/// The backend's registered name.
pub const NAME: &str = "metal";

/// Tokens a stream holds before the engine waits for its consumer.
const STREAM_BUFFER: usize = 4;

/// Most rows run together in one batch; longer batches run in groups of
/// prompts of similar length.
pub const MAX_BATCH: usize = 16;

/// The MLX backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct MetalBackend;

/// The backend as inference-core wants it.
pub fn backend() -> Arc<dyn Backend> {
    Arc::new(MetalBackend)
}

/// Registers `"metal"` in inference-core's process-wide registry (idempotent).
pub fn register() {
    inference_core::register(backend());
}

impl Backend for MetalBackend {
    fn name(&self) -> &str {
        NAME
    }

    /// MLX is linked in, so its CPU device is always there.
    fn available(&self) -> bool {
        true
    }

    fn load_model(&self, path: &Path, settings: &LoadSettings) -> CoreResult<Box<dyn TextModel>> {
        Ok(Box::new(MetalModel::load(path, settings)?))
    }
}

/// Turns a crate error into inference-core's. The message carries the whole
/// story (op, path, cause), so it is not chained again as a source.
pub(crate) fn core_err(e: Error) -> CoreError {
    CoreError::backend(NAME, e.to_string())
}

type Job = Box<dyn FnOnce(&mut Engine) + Send>;

/// The way to a model's engine thread, shared by the model and its sessions.
type Jobs = Arc<Mutex<Option<mpsc::Sender<Job>>>>;

/// Runs `job` on the engine thread.
fn submit(jobs: &Jobs, job: Job) -> CoreResult<()> {
    let guard = lock(jobs);
    let tx = guard.as_ref().ok_or(CoreError::Closed)?;
    tx.send(job).map_err(|_| CoreError::backend(NAME, "the engine thread has stopped"))
}

/// Runs `f` on the engine thread and waits for its answer.
fn call<T: Send + 'static>(
    jobs: &Jobs,
    f: impl FnOnce(&mut Engine) -> CoreResult<T> + Send + 'static,
) -> CoreResult<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    submit(
        jobs,
        Box::new(move |e| {
            let _ = tx.send(f(e));
        }),
    )?;
    rx.recv().map_err(|_| CoreError::backend(NAME, "the engine thread stopped during the call"))?
}

/// Rejects an empty prompt or one longer than the context.
fn check_prompt(ids: &[u32], limit: Option<usize>) -> CoreResult<()> {
    if ids.is_empty() {
        return Err(CoreError::EmptyPrompt);
    }
    if let Some(limit) = limit
        && ids.len() > limit
    {
        return Err(CoreError::invalid_setting(
            "prompt",
            format!("{} tokens", ids.len()),
            format!("longer than the context length of {limit} tokens"),
        ));
    }
    Ok(())
}

/// A model loaded on its engine thread.
pub struct MetalModel {
    jobs: Jobs,
    thread: Mutex<Option<JoinHandle<()>>>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    info: ModelInfo,
    desc: Description,
    device: Device,
    context_length: Option<usize>,
    metrics: Arc<Mutex<GenerateMetrics>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the engine thread owns.
pub(crate) struct Engine {
    loaded: LoadedModel,
    tokenizer: Tokenizer,
    metrics: Arc<Mutex<GenerateMetrics>>,
    context_length: Option<usize>,
    fingerprint: Fingerprint,
    sessions: HashMap<u64, SessionCache>,
    /// Set when this process is one rank of a tensor-parallel job.
    mirror: Option<Mirror>,
}

impl MetalModel {
    /// Loads the model at `path` (a directory, or a file in it) on a new engine thread.
    pub fn load(path: &Path, settings: &LoadSettings) -> CoreResult<MetalModel> {
        settings.validate()?;
        let adapter_path = settings.adapter_path.clone();
        let device = match settings.device {
            inference_core::Device::Auto => Device::best(),
            inference_core::Device::Cpu => Device::Cpu,
            inference_core::Device::Gpu => {
                if !Device::Gpu.is_available() {
                    return Err(CoreError::BackendUnavailable {
                        name: NAME.into(),
                        reason: "the GPU was requested but this MLX build has no GPU device here".into(),
                    });
                }
                Device::Gpu
            }
        };
        let dir = model::model_dir(path).map_err(core_err)?;
        // Tensor parallelism (docs/distributed.md): this process is one rank.
        let tensor_parallel =
            crate::distributed::TensorParallelOptions::from_backend_options(&settings.backend_options)
                .map_err(core_err)?;
        let tokenizer = Tokenizer::from_dir(&dir).map_err(core_err)?;
        let metrics = Arc::new(Mutex::new(GenerateMetrics::default()));
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<Description, Error>>(1);
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let engine_tokenizer = tokenizer.clone();
        let engine_metrics = Arc::clone(&metrics);
        let context_length = settings.context_length;
        let thread = std::thread::Builder::new()
            .name(format!("mlx-engine-{}", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()))
            .spawn(move || {
                // Dropped last, after the model: see `finish_thread`.
                let _finish = crate::device::FinishThread(device);
                let _scope = match DeviceScope::new(device) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let (loaded, mirror) = match &tensor_parallel {
                    Some(options) => match options.join() {
                        Ok(tp) => (model::load_sharded(&dir, tp.clone()), Some(Mirror::new(tp))),
                        Err(e) => (Err(e), None),
                    },
                    None => (model::load(&dir), None),
                };
                let mut loaded = match loaded {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Some(adapter) = &adapter_path
                    && let Err(e) = crate::lora::load_adapter(loaded.model.as_mut(), adapter)
                {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let desc = loaded.model.description().clone();
                let config_json = std::fs::read(loaded.dir.join("config.json")).unwrap_or_default();
                let fingerprint = Fingerprint::new(&desc, &config_json);
                let _ = ready_tx.send(Ok(desc));
                let mut engine = Engine {
                    loaded,
                    tokenizer: engine_tokenizer,
                    metrics: engine_metrics,
                    context_length,
                    fingerprint,
                    sessions: HashMap::new(),
                    mirror,
                };
                while let Ok(job) = job_rx.recv() {
                    job(&mut engine);
                }
                // Closed on rank 0: the other ranks leave their follower loop.
                if let Some(m) = engine.mirror.as_ref().filter(|m| m.is_root())
                    && let Err(e) = m.announce(&Request::Shutdown)
                {
                    eprintln!("mlx-metal: could not tell the other tensor-parallel ranks to stop: {e}");
                }
            })
            .map_err(|e| CoreError::backend(NAME, format!("could not start the engine thread: {e}")))?;
        let desc = match ready_rx.recv() {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(core_err(e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(CoreError::backend(NAME, "the engine thread stopped while loading the model"));
            }
        };
        let template = ChatTemplate::for_model(&tokenizer, &desc.architecture).map_err(core_err)?;
        let info = ModelInfo { context_length: settings.context_length.or(desc.context_length), ..desc.clone() };
        Ok(MetalModel {
            jobs: Arc::new(Mutex::new(Some(job_tx))),
            thread: Mutex::new(Some(thread)),
            tokenizer,
            template,
            info,
            desc,
            device,
            context_length: settings.context_length,
            metrics,
        })
    }

    /// The MLX device the model runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template in use (the model's own, or a built-in fallback).
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Replaces the model's LoRA adapter on the engine thread: `Some(dir)`
    /// loads mlx-lm's adapter directory (`adapters.safetensors` and
    /// `adapter_config.json`), `None` removes the adapter. Jobs queued before
    /// run with the old adapter. On error the model is left without an adapter.
    /// KV caches filled before the swap hold the old adapter's keys and values,
    /// so every chat session of the model starts again (its next turn
    /// prefills the whole conversation).
    ///
    /// # Errors
    ///
    /// A missing or malformed adapter, one that does not fit this model
    /// (every mismatching tensor is listed), or [`CoreError::Closed`].
    pub fn set_adapter(&self, dir: Option<&Path>) -> CoreResult<()> {
        let dir = dir.map(Path::to_path_buf);
        self.call(move |engine| {
            engine.announce(|| Request::SetAdapter { dir: dir.clone() })?;
            engine.set_adapter(dir)
        })
    }

    /// Makes this process, rank 1 or later of a tensor-parallel job, run
    /// what rank 0's model runs: it receives each job rank 0 announces
    /// (generations, session turns, batches, classification, adapter swaps)
    /// and runs the same engine code, discarding the output, until rank 0's
    /// model is closed. Calls on this model wait until then.
    /// See docs/distributed.md, "Using it from a program".
    ///
    /// # Errors
    ///
    /// The model is not a tensor-parallel rank other than 0, a job failed on
    /// this rank (it should not: every rank runs the same inputs), or a
    /// collective failed (a rank died). The ranks are then out of step, so a
    /// program should exit unsuccessfully, which ends the job.
    pub fn follow(&self) -> CoreResult<()> {
        self.call(Engine::follow)
    }

    /// This process's rank when it is one rank of a tensor-parallel job.
    pub fn tensor_parallel_rank(&self) -> CoreResult<Option<i32>> {
        self.call(|e| Ok(e.mirror.as_ref().map(Mirror::rank)))
    }

    /// Runs `f` on the engine thread and waits for its answer.
    pub(crate) fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> CoreResult<T> + Send + 'static,
    ) -> CoreResult<T> {
        call(&self.jobs, f)
    }

    fn limit(&self) -> Option<usize> {
        self.context_length.or(self.desc.context_length)
    }

    fn check_prompt(&self, ids: &[u32]) -> CoreResult<()> {
        check_prompt(ids, self.limit())
    }

    /// Encodes a batch: an error for an empty batch, and per prompt its ids
    /// or why it cannot run.
    fn encode_batch(&self, prompts: &[&str]) -> CoreResult<Vec<CoreResult<Vec<u32>>>> {
        if prompts.is_empty() {
            return Err(CoreError::invalid_setting("prompts", "[]", "the batch has no prompts"));
        }
        Ok(prompts
            .iter()
            .map(|p| {
                if p.is_empty() {
                    return Err(CoreError::EmptyPrompt);
                }
                let ids = self.tokenizer.encode_prompt(p).map_err(core_err)?;
                self.check_prompt(&ids)?;
                Ok(ids)
            })
            .collect())
    }

    /// Starts a chat session (see [`ChatSession`]); the concrete type, for
    /// callers that use mlx-metal directly.
    pub fn session(&self) -> CoreResult<MetalSession> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        if lock(&self.jobs).is_none() {
            return Err(CoreError::Closed);
        }
        Ok(MetalSession {
            id,
            jobs: Arc::clone(&self.jobs),
            tokenizer: self.tokenizer.clone(),
            template: self.template.clone(),
            limit: self.limit(),
        })
    }

    fn stream(&self, ids: Vec<u32>, settings: &GenerateSettings, cancel: CancelToken) -> CoreResult<TokenStream> {
        settings.validate()?;
        self.check_prompt(&ids)?;
        // A short buffer: the consumer rarely falls behind, and a cancel or a
        // dropped stream then stops generation within a few tokens.
        let (sink, stream) = TokenStream::channel_with_capacity(cancel, STREAM_BUFFER);
        let settings = settings.clone();
        submit(
            &self.jobs,
            Box::new(move |engine: &mut Engine| {
                let settings = engine.seeded(settings);
                if let Err(e) = engine.announce(|| Request::Generate { ids: ids.clone(), settings: settings.clone() }) {
                    return sink.fail(e);
                }
                engine.generate_into(&ids, &settings, sink)
            }),
        )?;
        Ok(stream)
    }
}

impl Drop for MetalModel {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl TextModel for MetalModel {
    fn generate(&self, prompt: &str, settings: &GenerateSettings, cancel: CancelToken) -> CoreResult<TokenStream> {
        if prompt.is_empty() {
            return Err(CoreError::EmptyPrompt);
        }
        let ids = self.tokenizer.encode_prompt(prompt).map_err(core_err)?;
        self.stream(ids, settings, cancel)
    }

    fn chat(&self, messages: &[Message], settings: &GenerateSettings, cancel: CancelToken) -> CoreResult<TokenStream> {
        if messages.is_empty() {
            return Err(CoreError::EmptyPrompt);
        }
        let ids = self.template.render_and_encode(&self.tokenizer, messages).map_err(core_err)?;
        self.stream(ids, settings, cancel)
    }

    fn classify(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> CoreResult<Vec<ClassifyResult>> {
        settings.validate()?;
        let encoded = self.encode_batch(prompts)?;
        let encoded = encoded.into_iter().collect::<CoreResult<Vec<_>>>()?;
        let settings = settings.clone();
        self.call(move |e| {
            let settings = e.seeded(settings);
            e.announce(|| Request::Classify { prompts: encoded.clone(), settings: settings.clone() })?;
            e.classify(&encoded, &settings, &cancel)
        })
    }

    /// Runs the prompts as left-padded batches (at most [`MAX_BATCH`] rows,
    /// grouped by length); each row's tokens equal a run of its prompt alone
    /// (greedy; sampled rows share one random stream). An empty or
    /// over-long prompt fails in its own result; a cancel ends every
    /// unfinished row with [`CoreError::Cancelled`], keeping its tokens.
    fn batch_generate(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> CoreResult<Vec<BatchResult>> {
        settings.validate()?;
        let encoded = self.encode_batch(prompts)?;
        let settings = settings.clone();
        self.call(move |e| {
            let settings = e.seeded(settings);
            e.announce(|| Request::Batch {
                prompts: encoded.iter().map(|p| p.as_ref().ok().cloned()).collect(),
                settings: settings.clone(),
            })?;
            Ok(e.batch_generate(encoded, &settings, &cancel))
        })
    }

    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn metrics(&self) -> GenerateMetrics {
        *lock(&self.metrics)
    }

    fn model_type(&self) -> &str {
        &self.info.architecture
    }

    fn attention_inspector(&self) -> Option<&dyn AttentionInspector> {
        Some(self)
    }

    fn new_session(&self) -> CoreResult<Box<dyn ChatSession>> {
        Ok(Box::new(self.session()?))
    }

    fn close(&self) -> CoreResult<()> {
        drop(lock(&self.jobs).take());
        if let Some(t) = lock(&self.thread).take()
            && t.join().is_err()
        {
            return Err(CoreError::backend(NAME, "the engine thread panicked"));
        }
        Ok(())
    }
}

impl AttentionInspector for MetalModel {
    /// One prefill of `prompt`; keys and queries are captured after the q/k
    /// norms and rope, for every position of the prompt (sliding-window
    /// layers included, whatever their cache keeps).
    fn inspect_attention(&self, prompt: &str, cancel: CancelToken) -> CoreResult<AttentionSnapshot> {
        if prompt.is_empty() {
            return Err(CoreError::EmptyPrompt);
        }
        let ids = self.tokenizer.encode_prompt(prompt).map_err(core_err)?;
        self.check_prompt(&ids)?;
        let architecture = self.info.architecture.clone();
        self.call(move |e| {
            cancel.check()?;
            e.announce(|| Request::Inspect { ids: ids.clone() })?;
            e.inspect(&ids, architecture).map_err(core_err)
        })
    }
}

/// `[1, H, L, D]` → per head, `L * D` values.
fn per_head(a: &Array) -> Result<Vec<Vec<f32>>, Error> {
    let shape = a.shape();
    let (heads, len) = (shape[1] as usize, (shape[2] * shape[3]) as usize);
    let flat = a.to_vec_f32()?;
    Ok((0..heads).map(|h| flat[h * len..(h + 1) * len].to_vec()).collect())
}

fn sampler_for(settings: &GenerateSettings) -> Result<Sampler, Error> {
    Sampler::new(SamplerConfig {
        temperature: settings.temperature,
        top_p: settings.top_p,
        min_p: settings.min_p,
        top_k: settings.effective_top_k().unwrap_or(0),
        min_tokens_to_keep: 1,
        repetition_penalty: settings.repetition_penalty,
        repetition_context_size: settings.repetition_context_size,
    })
}

fn metrics_from(stats: &GenerationStats) -> GenerateMetrics {
    let mut m = GenerateMetrics {
        prompt_tokens: stats.prompt_tokens,
        generated_tokens: stats.generated_tokens,
        cached_prompt_tokens: 0,
        prefill_duration: stats.prefill,
        decode_duration: stats.decode,
        total_duration: stats.prefill + stats.decode,
        peak_memory_bytes: stats.peak_memory as u64,
        active_memory_bytes: stats.active_memory as u64,
        ..GenerateMetrics::default()
    };
    m.compute_rates();
    m
}

/// Attaches the requested log-probabilities or logits to a token.
fn with_scores(mut token: Token, step: &Step<'_>, mode: LogitsMode) -> Result<Token, Error> {
    if mode == LogitsMode::None {
        return Ok(token);
    }
    let idx = Array::scalar(step.id as i32);
    token.logprob = Some(ops::take(step.logprobs, &idx, 0)?.to_vec_f32()?[0]);
    token.logits = Some(match mode {
        LogitsMode::Logits => step.logits.to_vec_f32()?,
        _ => step.logprobs.to_vec_f32()?,
    });
    Ok(token)
}

/// Turns a model's tokens into the tokens a caller sees: stops at EOS and
/// stop tokens, decodes text as it becomes complete, cuts at stop strings
/// and attaches the requested scores.
struct TextOut<'a> {
    settings: &'a GenerateSettings,
    tokenizer: &'a Tokenizer,
    decoder: StreamDecoder,
    stops: StopMatcher,
    held: Option<Token>,
}

impl<'a> TextOut<'a> {
    fn new(tokenizer: &'a Tokenizer, settings: &'a GenerateSettings) -> Self {
        TextOut {
            settings,
            tokenizer,
            decoder: tokenizer.stream_decoder(true),
            stops: StopMatcher::new(settings.stop_strings.iter().cloned()),
            held: None,
        }
    }

    /// Handles one step; `send` delivers a token and says whether the
    /// consumer is still there.
    fn push(&mut self, step: &Step<'_>, send: &mut impl FnMut(Token) -> bool) -> Result<ControlFlow<()>, Error> {
        let id = step.id;
        if self.settings.stop_tokens.contains(&id) || (!self.settings.ignore_eos && self.tokenizer.is_eos(id)) {
            return Ok(ControlFlow::Break(()));
        }
        let piece = self.decoder.push(id)?;
        let chunk = self.stops.push(&piece);
        let token = with_scores(Token::new(id, chunk.text), step, self.settings.logits)?;
        // A token whose text may still grow (held stop-string prefix or an
        // unfinished character) waits until the next token or the end.
        if let Some(prev) = self.held.take()
            && !send(prev)
        {
            return Ok(ControlFlow::Break(()));
        }
        if chunk.stopped {
            self.held = Some(token);
            return Ok(ControlFlow::Break(()));
        }
        if !self.settings.stop_strings.is_empty() || self.stops.has_pending() || self.decoder.has_pending() {
            self.held = Some(token);
        } else if !send(token) {
            return Ok(ControlFlow::Break(()));
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Delivers the held token with the rest of the text.
    fn finish(mut self, send: &mut impl FnMut(Token) -> bool) -> Result<(), Error> {
        if let Some(mut last) = self.held.take() {
            if !self.stops.is_stopped() {
                let tail = self.decoder.finish()?;
                let chunk = self.stops.push(&tail);
                last.text.push_str(&chunk.text);
                if !chunk.stopped {
                    last.text.push_str(&self.stops.finish());
                }
            }
            send(last);
        }
        Ok(())
    }
}

impl Engine {
    /// The most tokens to generate after `context` tokens of prompt.
    fn max_tokens(&self, context: usize, settings: &GenerateSettings) -> usize {
        match self.context_length {
            Some(ctx) => settings.max_tokens.min(ctx.saturating_sub(context)),
            None => settings.max_tokens,
        }
    }

    /// Generates into a token stream (on the engine thread).
    fn generate_into(&mut self, ids: &[u32], settings: &GenerateSettings, sink: TokenSink) {
        match self.generate_once(ids, settings, &sink) {
            Ok(m) => sink.finish(m),
            Err(e) => sink.fail(e),
        }
    }

    fn generate_once(
        &mut self,
        ids: &[u32],
        settings: &GenerateSettings,
        sink: &TokenSink,
    ) -> CoreResult<GenerateMetrics> {
        let stats = self.run_generation(ids, 0, settings, sink, None).map_err(core_err)?;
        let m = metrics_from(&stats);
        *lock(&self.metrics) = m;
        Ok(m)
    }

    /// Rank 0 of a tensor-parallel job: tells the other ranks to run the job
    /// `request()` describes (built only then). Nothing in a single process;
    /// an error on the other ranks, whose jobs come from rank 0.
    fn announce(&self, request: impl FnOnce() -> Request) -> CoreResult<()> {
        match &self.mirror {
            None => Ok(()),
            Some(m) if m.is_root() => m.announce(&request()).map_err(core_err),
            Some(m) => Err(CoreError::backend(
                NAME,
                format!(
                    "rank {} of a tensor-parallel job runs what rank 0 runs (MetalModel::follow); call rank 0's model",
                    m.rank()
                ),
            )),
        }
    }

    /// The settings a job runs with: in a tensor-parallel job, rank 0 fixes
    /// the seed so that every rank samples alike.
    fn seeded(&self, settings: GenerateSettings) -> GenerateSettings {
        match &self.mirror {
            Some(m) => m.seeded(settings),
            None => settings,
        }
    }

    /// The loop of ranks 1 and later: rank 0's jobs until it shuts down.
    fn follow(&mut self) -> CoreResult<()> {
        let rank = match &self.mirror {
            Some(m) if !m.is_root() => m.rank(),
            Some(_) => {
                return Err(CoreError::backend(
                    NAME,
                    "rank 0 of a tensor-parallel job takes calls; it does not follow",
                ));
            }
            None => return Err(CoreError::backend(NAME, "follow needs a model loaded as a tensor-parallel rank")),
        };
        let failed = |what: &str, e: CoreError| {
            CoreError::backend(
                NAME,
                format!("tensor-parallel rank {rank} failed {what} (the ranks are out of step): {e}"),
            )
        };
        loop {
            let request = match &self.mirror {
                Some(m) => m.receive().map_err(|e| failed("to receive rank 0's next job", core_err(e)))?,
                None => return Ok(()),
            };
            // The output goes nowhere: a sink whose stream is gone (sends fail
            // and are ignored in a tensor-parallel job; stopping is rank 0's).
            let (sink, _) = TokenStream::channel_with_capacity(CancelToken::new(), 0);
            let cancel = CancelToken::new();
            // Scores are rank 0's to hand out; here they would only be read back for nothing.
            let quiet = |mut s: GenerateSettings| {
                s.logits = LogitsMode::None;
                s
            };
            match request {
                Request::Generate { ids, settings } => {
                    self.generate_once(&ids, &quiet(settings), &sink).map_err(|e| failed("a generation", e))?;
                }
                Request::SessionTurn { session, ids, settings } => {
                    self.session_turn_once(session, &ids, &quiet(settings), &sink)
                        .map_err(|e| failed("a session turn", e))?;
                }
                Request::EndSession { session } => {
                    self.sessions.remove(&session);
                }
                Request::Classify { prompts, settings } => match self.classify(&prompts, &quiet(settings), &cancel) {
                    Ok(_) | Err(CoreError::Cancelled) => {}
                    Err(e) => return Err(failed("a classification", e)),
                },
                Request::Batch { prompts, settings } => {
                    let prompts = prompts.into_iter().map(|p| p.ok_or(CoreError::EmptyPrompt)).collect();
                    // Row errors are rank 0's to report; they are the same here.
                    self.batch_generate(prompts, &quiet(settings), &cancel);
                }
                Request::Inspect { ids } => {
                    self.inspect(&ids, String::new()).map_err(|e| failed("an attention inspection", core_err(e)))?;
                }
                Request::SetAdapter { dir } => {
                    // Rank 0 reports a bad adapter to its caller and is left without one; so is
                    // this rank, still in step.
                    if let Err(e) = self.set_adapter(dir) {
                        eprintln!("mlx-metal: tensor-parallel rank {rank}: the adapter swap failed as on rank 0: {e}");
                    }
                }
                Request::Shutdown => return Ok(()),
            }
        }
    }

    /// The generation itself: the loop plus EOS, stop tokens, stop strings,
    /// streaming text and the requested scores. `prior` tokens are already
    /// in `caches` (a session); `ids` are the new ones.
    pub(crate) fn run_generation(
        &mut self,
        ids: &[u32],
        prior: usize,
        settings: &GenerateSettings,
        sink: &TokenSink,
        caches: Option<&mut Vec<LayerCache>>,
    ) -> Result<GenerationStats, Error> {
        let sampler = sampler_for(settings)?;
        if let Some(seed) = settings.seed {
            Sampler::seed(seed)?;
        }
        let mut own_caches;
        let caches = match caches {
            Some(c) => c,
            None => {
                own_caches = self.loaded.model.make_cache()?;
                &mut own_caches
            }
        };
        let opts = LoopOptions { max_tokens: self.max_tokens(prior + ids.len(), settings), ..LoopOptions::default() };
        let tokenizer = self.tokenizer.clone();
        let mut out = TextOut::new(&tokenizer, settings);
        // In a tensor-parallel job a consumer that went away stops every
        // rank through the shared flag, never this rank alone.
        let mirrored = self.mirror.is_some();
        let mut send = |t: Token| sink.send(t).is_ok() || mirrored;
        let local = || sink.is_cancelled();
        let stop = self.stop_flag(&local);
        let cancelled = || stop.poll();
        let model = self.loaded.model.as_ref();
        let stats =
            generate::generate(model, caches, ids, &sampler, &opts, &cancelled, |step| out.push(&step, &mut send))?;
        stop.check()?;
        out.finish(&mut send)?;
        Ok(stats)
    }

    /// One turn of session `id` over the whole token sequence `ids`.
    fn session_turn(&mut self, id: u64, ids: &[u32], settings: &GenerateSettings, sink: TokenSink) {
        match self.session_turn_once(id, ids, settings, &sink) {
            Ok(m) => sink.finish(m),
            Err(e) => sink.fail(e),
        }
    }

    fn session_turn_once(
        &mut self,
        id: u64,
        ids: &[u32],
        settings: &GenerateSettings,
        sink: &TokenSink,
    ) -> CoreResult<GenerateMetrics> {
        let mut state = match self.sessions.remove(&id) {
            Some(s) => s,
            None => SessionCache::new(self.loaded.model.as_ref()).map_err(core_err)?,
        };
        let result = (|| {
            let cached = state.prepare(self.loaded.model.as_ref(), ids)?;
            let stats = self.run_generation(&ids[cached..], cached, settings, sink, Some(state.caches_mut()))?;
            state.record(self.loaded.model.as_ref(), ids, &stats.fed)?;
            Ok::<_, Error>((cached, stats))
        })();
        match result {
            Ok((cached, stats)) => {
                self.sessions.insert(id, state);
                let mut m = metrics_from(&stats);
                m.prompt_tokens = ids.len();
                m.cached_prompt_tokens = cached;
                m.compute_rates();
                *lock(&self.metrics) = m;
                Ok(m)
            }
            Err(e) => {
                // The caches may be half-updated: the session starts again.
                if state.reset(self.loaded.model.as_ref()).is_ok() {
                    self.sessions.insert(id, state);
                }
                Err(core_err(e))
            }
        }
    }

    /// The stop decision of a generation: `local()` in a single process;
    /// rank 0's `local()`, shared with every rank, in a tensor-parallel job.
    fn stop_flag<'a>(&'a self, local: &'a dyn Fn() -> bool) -> Stop<'a> {
        match &self.mirror {
            Some(m) => Stop::Shared(m.stop_flag(local)),
            None => Stop::Local(local),
        }
    }

    /// Swaps the LoRA adapter (see [`MetalModel::set_adapter`]).
    fn set_adapter(&mut self, dir: Option<PathBuf>) -> CoreResult<()> {
        self.sessions.clear();
        let model = self.loaded.model.as_mut();
        crate::lora::remove_lora(model);
        if let Some(dir) = dir {
            crate::lora::load_adapter(model, &dir).map_err(core_err)?;
        }
        // Layers without an adapter run their decode projections fused again.
        model.fuse_projections().map_err(core_err)
    }

    /// A session file holds one rank's caches only: refused in a tensor-parallel job.
    fn refuse_session_files(&self) -> CoreResult<()> {
        match &self.mirror {
            Some(_) => Err(CoreError::backend(
                NAME,
                "saving and loading chat sessions is not supported for a tensor-parallel model (each rank holds \
                 only its own attention heads' caches)",
            )),
            None => Ok(()),
        }
    }

    fn session_cache(&mut self, id: u64) -> Result<&mut SessionCache, Error> {
        if !self.sessions.contains_key(&id) {
            let fresh = SessionCache::new(self.loaded.model.as_ref())?;
            self.sessions.insert(id, fresh);
        }
        self.sessions.get_mut(&id).ok_or_else(|| Error::invalid("session", "the session vanished"))
    }

    fn inspect(&mut self, ids: &[u32], architecture: String) -> Result<AttentionSnapshot, Error> {
        let model = self.loaded.model.as_ref();
        let mut caches = model.make_cache()?;
        let x: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let x = Array::from_slice(&x, &[1, x.len() as i32])?;
        let mut taps = model::AttentionTaps::default();
        let logits = model.forward_tapped(&x, &mut caches, Some(&mut taps))?;
        logits.eval()?;
        let mut snap =
            AttentionSnapshot { architecture, num_layers: taps.layers.len(), ..AttentionSnapshot::default() };
        for (q, k) in &taps.layers {
            let (qs, ks) = (q.shape(), k.shape());
            snap.num_query_heads = qs[1] as usize;
            snap.num_heads = ks[1] as usize;
            snap.seq_len = ks[2] as usize;
            snap.head_dim = ks[3] as usize;
            snap.queries.push(per_head(q)?);
            snap.keys.push(per_head(k)?);
        }
        Ok(snap)
    }

    /// Classifies in left-padded batches: one prefill, one sample at each
    /// prompt's last token.
    fn classify(
        &mut self,
        prompts: &[Vec<u32>],
        settings: &GenerateSettings,
        cancel: &CancelToken,
    ) -> CoreResult<Vec<ClassifyResult>> {
        let sampler = sampler_for(settings).map_err(core_err)?;
        if let Some(seed) = settings.seed {
            Sampler::seed(seed).map_err(core_err)?;
        }
        let start = Instant::now();
        crate::memory::reset_peak_memory().map_err(core_err)?;
        let mut out: Vec<Option<ClassifyResult>> = (0..prompts.len()).map(|_| None).collect();
        let local = || cancel.is_cancelled();
        let stop = self.stop_flag(&local);
        let cancelled = || stop.poll();
        for group in groups(prompts.iter().map(Vec::len)) {
            if cancelled() {
                stop.check().map_err(core_err)?;
                return Err(CoreError::Cancelled);
            }
            let rows: Vec<&[u32]> = group.iter().map(|&i| prompts[i].as_slice()).collect();
            let model = self.loaded.model.as_ref();
            let pre = batch::prefill(model, &rows, generate::PREFILL_STEP, &cancelled).map_err(core_err)?;
            stop.check().map_err(core_err)?;
            let Some(pre) = pre else { return Err(CoreError::Cancelled) };
            let results = self.classify_rows(&pre.logits, &sampler, settings.logits).map_err(core_err)?;
            for (&i, r) in group.iter().zip(results) {
                out[i] = Some(r);
            }
        }
        let elapsed = start.elapsed();
        let mut m = GenerateMetrics {
            prompt_tokens: prompts.iter().map(Vec::len).sum(),
            generated_tokens: prompts.len(),
            prefill_duration: elapsed,
            total_duration: elapsed,
            peak_memory_bytes: crate::memory::peak_memory().unwrap_or(0) as u64,
            active_memory_bytes: crate::memory::active_memory().unwrap_or(0) as u64,
            ..GenerateMetrics::default()
        };
        m.compute_rates();
        *lock(&self.metrics) = m;
        out.into_iter().map(|r| r.ok_or_else(|| CoreError::backend(NAME, "a prompt was not classified"))).collect()
    }

    fn classify_rows(&self, logits: &Array, sampler: &Sampler, mode: LogitsMode) -> Result<Vec<ClassifyResult>, Error> {
        let logprobs = Sampler::logprobs(logits)?;
        let ids = sampler.sample(&logprobs)?;
        let ids = batch::read_ids("classify", &ids)?;
        let mut out = Vec::with_capacity(ids.len());
        for (row, &id) in ids.iter().enumerate() {
            let r = row as i32;
            let lp_row = ops::squeeze(&ops::slice_axis(&logprobs, 0, r, r + 1)?, &[0])?;
            let logits_row = ops::squeeze(&ops::slice_axis(logits, 0, r, r + 1)?, &[0])?;
            let text = self.tokenizer.decode(&[id], true)?;
            let token = with_scores(Token::new(id, text), &Step { id, logprobs: &lp_row, logits: &logits_row }, mode)?;
            let logits = token.logits.clone();
            out.push(ClassifyResult { token, logits });
        }
        Ok(out)
    }

    /// Generates for every prompt that encoded, in length-sorted groups.
    fn batch_generate(
        &mut self,
        prompts: Vec<CoreResult<Vec<u32>>>,
        settings: &GenerateSettings,
        cancel: &CancelToken,
    ) -> Vec<BatchResult> {
        let mut results: Vec<BatchResult> =
            prompts.iter().map(|_| BatchResult { tokens: Vec::new(), error: None }).collect();
        let mut runnable = Vec::new();
        for (i, p) in prompts.into_iter().enumerate() {
            match p {
                Ok(ids) => runnable.push((i, ids)),
                Err(e) => results[i].error = Some(e),
            }
        }
        let start = Instant::now();
        // Each group's run resets MLX's peak; the call's peak is the largest of them.
        let mut total = batch::BatchStats::default();
        let sampler = match sampler_for(settings) {
            Ok(s) => s,
            Err(e) => {
                fail_rows(&mut results, runnable.iter().map(|(i, _)| *i), &core_err(e));
                return results;
            }
        };
        if let Some(seed) = settings.seed
            && let Err(e) = Sampler::seed(seed)
        {
            fail_rows(&mut results, runnable.iter().map(|(i, _)| *i), &core_err(e));
            return results;
        }
        let tokenizer = self.tokenizer.clone();
        for group in groups(runnable.iter().map(|(_, ids)| ids.len())) {
            let rows: Vec<&[u32]> = group.iter().map(|&g| runnable[g].1.as_slice()).collect();
            let limits: Vec<usize> = rows.iter().map(|r| self.max_tokens(r.len(), settings)).collect();
            let mut outs: Vec<TextOut<'_>> = rows.iter().map(|_| TextOut::new(&tokenizer, settings)).collect();
            let mut collected: Vec<Vec<Token>> = vec![Vec::new(); rows.len()];
            let local = || cancel.is_cancelled();
            let stop = self.stop_flag(&local);
            let cancelled = || stop.poll();
            let model = self.loaded.model.as_ref();
            let run =
                batch::generate(model, &rows, &sampler, &limits, generate::PREFILL_STEP, &cancelled, |r, step| {
                    let sink = &mut collected[r];
                    outs[r].push(&step, &mut |t| {
                        sink.push(t);
                        true
                    })
                });
            let run = run.and_then(|s| stop.check().map(|()| s));
            let stats = match run {
                Ok(s) => s,
                Err(e) => {
                    fail_rows(&mut results, group.iter().map(|&g| runnable[g].0), &core_err(e));
                    continue;
                }
            };
            for ((out, mut tokens), &g) in outs.into_iter().zip(collected).zip(&group) {
                let i = runnable[g].0;
                let finished = out.finish(&mut |t| {
                    tokens.push(t);
                    true
                });
                results[i].tokens = tokens;
                if let Err(e) = finished {
                    results[i].error = Some(core_err(e));
                } else if stats.cancelled {
                    results[i].error = Some(CoreError::Cancelled);
                }
            }
            total.rows += stats.rows;
            total.prompt_tokens += stats.prompt_tokens;
            total.generated_tokens += stats.generated_tokens;
            total.prefill += stats.prefill;
            total.decode += stats.decode;
            total.peak_memory = total.peak_memory.max(stats.peak_memory);
        }
        let mut m = GenerateMetrics {
            prompt_tokens: total.prompt_tokens,
            generated_tokens: total.generated_tokens,
            prefill_duration: total.prefill,
            decode_duration: total.decode,
            total_duration: start.elapsed(),
            peak_memory_bytes: total.peak_memory as u64,
            active_memory_bytes: crate::memory::active_memory().unwrap_or(0) as u64,
            ..GenerateMetrics::default()
        };
        m.compute_rates();
        *lock(&self.metrics) = m;
        results
    }
}

/// When a generation stops: decided here, or by rank 0 of a tensor-parallel job.
enum Stop<'a> {
    Local(&'a dyn Fn() -> bool),
    Shared(mirror::StopFlag<'a>),
}

impl Stop<'_> {
    /// Whether to stop now (a collective per call in a tensor-parallel job).
    fn poll(&self) -> bool {
        match self {
            Stop::Local(f) => f(),
            Stop::Shared(flag) => flag.poll(),
        }
    }

    /// The error of a failed collective, if any.
    fn check(&self) -> Result<(), Error> {
        match self {
            Stop::Local(_) => Ok(()),
            Stop::Shared(flag) => flag.check(),
        }
    }
}

/// Sets `error` on the results at `rows` that have none.
fn fail_rows(results: &mut [BatchResult], rows: impl Iterator<Item = usize>, error: &CoreError) {
    for i in rows {
        if results[i].error.is_none() {
            results[i].error = Some(CoreError::backend(NAME, error.to_string()));
        }
    }
}

/// Indices of `lengths` grouped for batching: sorted by length, at most
/// [`MAX_BATCH`] per group.
fn groups(lengths: impl Iterator<Item = usize>) -> Vec<Vec<usize>> {
    let mut order: Vec<(usize, usize)> = lengths.enumerate().map(|(i, l)| (l, i)).collect();
    order.sort_unstable();
    order.chunks(MAX_BATCH).map(|c| c.iter().map(|&(_, i)| i).collect()).collect()
}

/// A chat session on a [`MetalModel`]: its KV cache lives on the model's
/// engine thread and is dropped with the session.
pub struct MetalSession {
    id: u64,
    jobs: Jobs,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    limit: Option<usize>,
}

impl MetalSession {
    fn turn(&mut self, ids: Vec<u32>, settings: &GenerateSettings, cancel: CancelToken) -> CoreResult<TokenStream> {
        settings.validate()?;
        check_prompt(&ids, self.limit)?;
        let (sink, stream) = TokenStream::channel_with_capacity(cancel, STREAM_BUFFER);
        let settings = settings.clone();
        let id = self.id;
        submit(
            &self.jobs,
            Box::new(move |e: &mut Engine| {
                let settings = e.seeded(settings);
                if let Err(err) =
                    e.announce(|| Request::SessionTurn { session: id, ids: ids.clone(), settings: settings.clone() })
                {
                    return sink.fail(err);
                }
                e.session_turn(id, &ids, &settings, sink)
            }),
        )?;
        Ok(stream)
    }
}

fn session_file_err(path: &Path, e: Error) -> CoreError {
    match e {
        Error::Io { source, .. } => CoreError::Io { path: path.to_path_buf(), source },
        Error::Model { message, .. } | Error::Format { message, .. } => CoreError::invalid_model(path, message),
        other => core_err(other),
    }
}

impl ChatSession for MetalSession {
    fn chat(
        &mut self,
        messages: &[Message],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> CoreResult<TokenStream> {
        if messages.is_empty() {
            return Err(CoreError::EmptyPrompt);
        }
        let ids = self.template.render_and_encode(&self.tokenizer, messages).map_err(core_err)?;
        self.turn(ids, settings, cancel)
    }

    fn generate(&mut self, prompt: &str, settings: &GenerateSettings, cancel: CancelToken) -> CoreResult<TokenStream> {
        if prompt.is_empty() {
            return Err(CoreError::EmptyPrompt);
        }
        let ids = self.tokenizer.encode_prompt(prompt).map_err(core_err)?;
        self.turn(ids, settings, cancel)
    }

    fn cached_tokens(&self) -> CoreResult<usize> {
        let id = self.id;
        call(&self.jobs, move |e| Ok(e.sessions.get(&id).map_or(0, |s| s.tokens().len())))
    }

    fn reset(&mut self) -> CoreResult<()> {
        let id = self.id;
        call(&self.jobs, move |e| {
            e.announce(|| Request::EndSession { session: id })?;
            e.sessions.remove(&id);
            Ok(())
        })
    }

    fn save(&self, path: &Path) -> CoreResult<()> {
        let id = self.id;
        let path: PathBuf = path.to_path_buf();
        call(&self.jobs, move |e| {
            e.refuse_session_files()?;
            let fingerprint = e.fingerprint.clone();
            let state = e.session_cache(id).map_err(core_err)?;
            state.save(&path, &fingerprint).map_err(|err| session_file_err(&path, err))
        })
    }

    fn load(&mut self, path: &Path) -> CoreResult<()> {
        let id = self.id;
        let path: PathBuf = path.to_path_buf();
        call(&self.jobs, move |e| {
            e.refuse_session_files()?;
            let state = SessionCache::load(&path, e.loaded.model.as_ref(), &e.fingerprint)
                .map_err(|err| session_file_err(&path, err))?;
            e.sessions.insert(id, state);
            Ok(())
        })
    }
}

impl Drop for MetalSession {
    fn drop(&mut self) {
        let id = self.id;
        let _ = submit(
            &self.jobs,
            Box::new(move |e: &mut Engine| {
                // Only a session that ran holds caches on the other ranks.
                if e.sessions.remove(&id).is_some() {
                    let _ = e.announce(|| Request::EndSession { session: id });
                }
            }),
        );
    }
}
