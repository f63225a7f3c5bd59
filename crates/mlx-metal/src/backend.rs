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

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use inference_core::{
    AttentionInspector, AttentionSnapshot, Backend, BatchResult, CancelToken, ClassifyResult, Error as CoreError,
    GenerateMetrics, GenerateSettings, LoadSettings, LogitsMode, Message, ModelInfo, Result as CoreResult, TextModel,
    Token, TokenSink, TokenStream,
};

use crate::array::Array;
use crate::cache::LayerCache;
use crate::chat::ChatTemplate;
use crate::device::{Device, DeviceScope};
use crate::error::Error;
use crate::generate::{self, GenerationStats, LoopOptions, Step};
use crate::model::{self, Description, LoadedModel};
use crate::ops;
use crate::sample::{Sampler, SamplerConfig};
use crate::tokenizer::{StopMatcher, Tokenizer};

/// The backend's registered name.
pub const NAME: &str = "metal";

/// Tokens a stream holds before the engine waits for its consumer.
const STREAM_BUFFER: usize = 4;

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

/// A model loaded on its engine thread.
pub struct MetalModel {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
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
                let _scope = match DeviceScope::new(device) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut loaded = match model::load(&dir) {
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
                let _ = ready_tx.send(Ok(loaded.model.description().clone()));
                let mut engine =
                    Engine { loaded, tokenizer: engine_tokenizer, metrics: engine_metrics, context_length };
                while let Ok(job) = job_rx.recv() {
                    job(&mut engine);
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
            jobs: Mutex::new(Some(job_tx)),
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
    /// KV caches filled before the swap hold the old adapter's keys and values:
    /// anything that keeps a cache across calls must start a new one.
    ///
    /// # Errors
    ///
    /// A missing or malformed adapter, one that does not fit this model
    /// (every mismatching tensor is listed), or [`CoreError::Closed`].
    pub fn set_adapter(&self, dir: Option<&Path>) -> CoreResult<()> {
        let dir = dir.map(Path::to_path_buf);
        self.call(move |engine| {
            let model = engine.loaded.model.as_mut();
            crate::lora::remove_lora(model);
            if let Some(dir) = dir {
                crate::lora::load_adapter(model, &dir).map_err(core_err)?;
            }
            Ok(())
        })
    }

    /// Runs `job` on the engine thread.
    pub(crate) fn submit(&self, job: Job) -> CoreResult<()> {
        let guard = lock(&self.jobs);
        let tx = guard.as_ref().ok_or(CoreError::Closed)?;
        tx.send(job).map_err(|_| CoreError::backend(NAME, "the engine thread has stopped"))
    }

    /// Runs `f` on the engine thread and waits for its answer.
    pub(crate) fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> CoreResult<T> + Send + 'static,
    ) -> CoreResult<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move |e| {
            let _ = tx.send(f(e));
        }))?;
        rx.recv().map_err(|_| CoreError::backend(NAME, "the engine thread stopped during the call"))?
    }

    fn check_prompt(&self, ids: &[u32]) -> CoreResult<()> {
        if ids.is_empty() {
            return Err(CoreError::EmptyPrompt);
        }
        let limit = self.context_length.or(self.desc.context_length);
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

    fn stream(&self, ids: Vec<u32>, settings: &GenerateSettings, cancel: CancelToken) -> CoreResult<TokenStream> {
        settings.validate()?;
        self.check_prompt(&ids)?;
        // A short buffer: the consumer rarely falls behind, and a cancel or a
        // dropped stream then stops generation within a few tokens.
        let (sink, stream) = TokenStream::channel_with_capacity(cancel, STREAM_BUFFER);
        let settings = settings.clone();
        self.submit(Box::new(move |engine: &mut Engine| engine.generate_into(&ids, &settings, sink)))?;
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
        let mut encoded = Vec::with_capacity(prompts.len());
        for p in prompts {
            if p.is_empty() {
                return Err(CoreError::EmptyPrompt);
            }
            let ids = self.tokenizer.encode_prompt(p).map_err(core_err)?;
            self.check_prompt(&ids)?;
            encoded.push(ids);
        }
        let settings = settings.clone();
        self.call(move |e| e.classify(&encoded, &settings, &cancel))
    }

    fn batch_generate(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> CoreResult<Vec<BatchResult>> {
        settings.validate()?;
        let mut results = Vec::with_capacity(prompts.len());
        for p in prompts {
            let stream = self.generate(p, settings, cancel.clone());
            results.push(match stream {
                Ok(s) => s.into_batch_result(),
                Err(e) => BatchResult { tokens: Vec::new(), error: Some(e) },
            });
        }
        Ok(results)
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

impl Engine {
    fn max_tokens(&self, prompt_len: usize, settings: &GenerateSettings) -> usize {
        match self.context_length {
            Some(ctx) => settings.max_tokens.min(ctx.saturating_sub(prompt_len)),
            None => settings.max_tokens,
        }
    }

    /// Generates into a token stream (on the engine thread).
    fn generate_into(&mut self, ids: &[u32], settings: &GenerateSettings, sink: TokenSink) {
        let result = self.run_generation(ids, settings, &sink, None);
        match result {
            Ok(stats) => {
                let m = metrics_from(&stats);
                *lock(&self.metrics) = m;
                sink.finish(m);
            }
            Err(e) => sink.fail(core_err(e)),
        }
    }

    /// The generation itself: the loop plus EOS, stop tokens, stop strings,
    /// streaming text and the requested scores.
    pub(crate) fn run_generation(
        &mut self,
        ids: &[u32],
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
        let opts = LoopOptions { max_tokens: self.max_tokens(ids.len(), settings), ..LoopOptions::default() };
        let tokenizer = self.tokenizer.clone();
        let mut decoder = tokenizer.stream_decoder(true);
        let mut stops = StopMatcher::new(settings.stop_strings.iter().cloned());
        let hold_for_stops = !settings.stop_strings.is_empty();
        let mut held: Option<Token> = None;
        let cancelled = || sink.is_cancelled();
        let model = self.loaded.model.as_ref();
        let stats = generate::generate(model, caches, ids, &sampler, &opts, &cancelled, |step| {
            let id = step.id;
            if settings.stop_tokens.contains(&id) || (!settings.ignore_eos && tokenizer.is_eos(id)) {
                return Ok(ControlFlow::Break(()));
            }
            let piece = decoder.push(id)?;
            let chunk = stops.push(&piece);
            let token = with_scores(Token::new(id, chunk.text), &step, settings.logits)?;
            // A token whose text may still grow (held stop-string prefix or an
            // unfinished character) waits until the next token or the end.
            if let Some(prev) = held.take()
                && sink.send(prev).is_err()
            {
                return Ok(ControlFlow::Break(()));
            }
            if chunk.stopped {
                held = Some(token);
                return Ok(ControlFlow::Break(()));
            }
            if hold_for_stops || stops.has_pending() || decoder.has_pending() {
                held = Some(token);
            } else if sink.send(token).is_err() {
                return Ok(ControlFlow::Break(()));
            }
            Ok(ControlFlow::Continue(()))
        })?;
        if let Some(mut last) = held.take() {
            if !stops.is_stopped() {
                let tail = decoder.finish()?;
                let chunk = stops.push(&tail);
                last.text.push_str(&chunk.text);
                if !chunk.stopped {
                    last.text.push_str(&stops.finish());
                }
            }
            let _ = sink.send(last);
        }
        Ok(stats)
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
        let start = std::time::Instant::now();
        crate::memory::reset_peak_memory().map_err(core_err)?;
        let mut out = Vec::with_capacity(prompts.len());
        for ids in prompts {
            if cancel.is_cancelled() {
                return Err(CoreError::Cancelled);
            }
            let r = self.classify_one(ids, &sampler, settings.logits).map_err(core_err)?;
            out.push(r);
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
        Ok(out)
    }

    fn classify_one(&mut self, ids: &[u32], sampler: &Sampler, mode: LogitsMode) -> Result<ClassifyResult, Error> {
        let model = self.loaded.model.as_ref();
        let mut caches = model.make_cache()?;
        let x: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let x = Array::from_slice(&x, &[1, x.len() as i32])?;
        let logits = model.forward(&x, &mut caches)?;
        let len = logits.dim(1)?;
        let last = ops::squeeze(&ops::slice_axis(&logits, 1, len - 1, len)?, &[1])?;
        let logprobs = Sampler::logprobs(&last)?;
        let id = generate::token_id(&sampler.sample(&logprobs)?)?;
        let text = self.tokenizer.decode(&[id], true)?;
        let lp_row = ops::squeeze(&logprobs, &[0])?;
        let logits_row = ops::squeeze(&last, &[0])?;
        let token = with_scores(Token::new(id, text), &Step { id, logprobs: &lp_row, logits: &logits_row }, mode)?;
        let logits = token.logits.clone();
        Ok(ClassifyResult { token, logits })
    }
}
