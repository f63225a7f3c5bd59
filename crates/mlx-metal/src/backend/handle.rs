// SPDX-License-Identifier: EUPL-1.2
//! [`MetalModel`]: the `Send + Sync` handle of a model that lives on its own
//! engine thread, and its `inference-core` methods.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use inference_core::{
    AttentionInspector, AttentionSnapshot, BatchResult, CancelToken, ChatSession, ClassifyResult, EngineLoad,
    Error as CoreError, GenerateMetrics, GenerateSettings, LoadSettings, ModelInfo, PreparedPrompt, PromptInput,
    Result as CoreResult, TextModel, TokenStream,
};
use mlx::Error;
use mlx::device::{Device, DeviceScope};

use super::engine::Engine;
use super::mirror::{Mirror, Request};
use super::options::{prompt_cache_dir, quantised_policy, speculative, speculator};
use super::scheduler::{Limits, Scheduler};
use super::session::MetalSession;
use super::{Job, Jobs, NAME, call, check_prompt, core_err, lock, submit};
use crate::chat::ChatTemplate;
use crate::constrain::Grammars;
use crate::model::{self, Description};
use crate::session::Fingerprint;
use crate::tokenizer::Tokenizer;

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
    load: Arc<Mutex<EngineLoad>>,
    /// The constraint compiler, shared with the scheduler (built on first use).
    grammars: Arc<Grammars>,
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
        let tensor_parallel = crate::model::tp::TensorParallelOptions::from_backend_options(&settings.backend_options)
            .map_err(core_err)?;
        let limits = Limits::from_backend_options(&settings.backend_options).map_err(core_err)?;
        let prompt_cache_dir = prompt_cache_dir(&settings.backend_options, tensor_parallel.is_some())?;
        let tokenizer = {
            let _span = tracing::debug_span!("load_tokenizer", dir = %dir.display()).entered();
            Tokenizer::from_dir(&dir).map_err(core_err)?
        };
        let speculative = speculative(&settings.backend_options, tensor_parallel.is_some(), &tokenizer)?;
        let metrics = Arc::new(Mutex::new(GenerateMetrics::default()));
        let load = Arc::new(Mutex::new(EngineLoad::default()));
        let engine_load = Arc::clone(&load);
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<Description, Error>>(1);
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let engine_tokenizer = tokenizer.clone();
        let grammars = Arc::new(Grammars::new(tokenizer.clone()));
        let engine_grammars = Arc::clone(&grammars);
        let engine_metrics = Arc::clone(&metrics);
        let context_length = settings.context_length;
        let policy = model::dtype::DtypePolicy::from_setting(settings.dtype, device);
        let quantised = quantised_policy(&settings.backend_options)?;
        // The loading on the engine thread runs inside the caller's span.
        let caller = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name(format!("mlx-engine-{}", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()))
            .spawn(move || {
                // Dropped last, after the model: see `finish_thread`.
                let _finish = mlx::device::FinishThread(device);
                let _scope = match DeviceScope::new(device) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let loading = caller.enter();
                let (loaded, mirror) = match &tensor_parallel {
                    Some(options) => match options.join() {
                        Ok(tp) => (
                            model::load_with_quantised(&dir, Some(tp.clone()), policy, quantised),
                            Some(Mirror::new(tp, options.step_timeout)),
                        ),
                        Err(e) => (Err(e), None),
                    },
                    None => (model::load_with_quantised(&dir, None, policy, quantised), None),
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
                let mut scheduler = Scheduler::new(limits, engine_load, mirror.is_some(), Some(engine_grammars));
                // The draft model first: its caches count in the KV budget.
                if let Some(config) = speculative {
                    match speculator(config, policy, quantised) {
                        Ok(s) => scheduler.speculate_with(s),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                }
                if let Err(e) = scheduler.size_up(loaded.model.as_ref()) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let desc = Description {
                    compute_dtype: Some(loaded.compute.dtype.name().to_owned()),
                    compute_dtype_reason: Some(loaded.compute.reason.clone()),
                    ..loaded.model.description().clone()
                };
                let config_json = std::fs::read(loaded.dir.join("config.json")).unwrap_or_default();
                let mut fingerprint = Fingerprint::new(&desc, &config_json);
                // Dequantised layers compute (a little) differently from the packed ones.
                if loaded.compute.dequantise {
                    fingerprint.dtype.push_str(", dequantised");
                }
                if let Some(cache_dir) = &prompt_cache_dir {
                    let origin = adapter_path.as_deref().map_or(String::new(), |d| d.display().to_string());
                    if let Err(e) =
                        scheduler.open_prompt_cache_dir(cache_dir, loaded.model.as_ref(), &fingerprint, &origin)
                    {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(desc));
                // Jobs run inside their own callers' spans (see `submit`).
                drop(loading);
                let mut engine = Engine {
                    loaded,
                    tokenizer: engine_tokenizer,
                    metrics: engine_metrics,
                    context_length,
                    fingerprint,
                    sessions: HashMap::new(),
                    mirror,
                    scheduler,
                    turns: HashMap::new(),
                    after_drain: Vec::new(),
                    variants: super::adapters::Variants::new(limits),
                };
                let watchdog = engine.mirror.as_ref().and_then(Mirror::watchdog);
                super::supervise::run_engine(&mut engine, &job_rx, watchdog.as_ref());
                // Closed on rank 0: the other ranks leave their follower loop.
                if let Some(m) = engine.mirror.as_ref().filter(|m| m.is_root()) {
                    let _watched = watchdog.as_ref().map(|w| w.watch("the shutdown"));
                    if let Err(e) = m.announce(&Request::Shutdown, &[]) {
                        eprintln!("mlx-metal: could not tell the other tensor-parallel ranks to stop: {e}");
                    }
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
        if let (Some(asked), Some(trained)) = (settings.context_length, desc.context_length)
            && asked > trained
        {
            tracing::warn!(
                context_length = asked,
                model = trained,
                "the context length asked for is beyond the model's own (max_position_embeddings): positions past it \
                 were never trained and answers there degrade"
            );
        }
        let template = ChatTemplate::for_model(&tokenizer, &desc.architecture).map_err(core_err)?;
        let info = ModelInfo {
            context_length: settings.context_length.or(desc.context_length),
            tool_call_format: template.tool_call_format(),
            has_chat_template: tokenizer.chat_template().is_some(),
            ..desc.clone()
        };
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
            load,
            grammars,
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
    /// `adapter_config.json`), `None` removes the adapter. Generations started
    /// before finish with the old adapter (the swap waits for them; those
    /// started meanwhile wait for the swap). On error the model is left without an adapter (in a
    /// tensor-parallel job, every rank is, whichever rank failed; the error names it).
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
        let (tx, rx) = mpsc::sync_channel(1);
        submit(
            &self.jobs,
            Box::new(move |engine: &mut Engine| {
                engine.after_drain(Box::new(move |engine: &mut Engine| {
                    let swapped = engine
                        .announce(|| Request::SetAdapter { dir: dir.clone() })
                        .and_then(|()| engine.swap_adapter(dir));
                    let _ = tx.send(swapped);
                }))
            }),
        )?;
        rx.recv().map_err(|_| CoreError::backend(NAME, "the engine failed during the call (its log says why)"))?
    }

    /// Makes this process, rank 1 or later of a tensor-parallel job, run
    /// what rank 0's model runs: it receives each job rank 0 announces
    /// (generations, session turns, batches, classification, adapter swaps)
    /// and runs the same engine code, discarding the output, until rank 0's
    /// model is closed. Calls on this model wait until then.
    /// See docs/distributed.md, "Using it from a program".
    ///
    /// A generation that fails on this rank alone is reported to rank 0 at
    /// the next exchange, and every rank ends it (rank 0's caller gets the
    /// error); a failed adapter swap or attention inspection is reported to
    /// rank 0's caller too. This rank goes on following.
    ///
    /// # Errors
    ///
    /// The model is not a tensor-parallel rank other than 0, or a collective
    /// failed (a rank died). The ranks are then out of step, so a program
    /// should exit unsuccessfully, which ends the job.
    pub fn follow(&self) -> CoreResult<()> {
        self.call(Engine::follow)
    }

    /// This process's rank when it is one rank of a tensor-parallel job.
    pub fn tensor_parallel_rank(&self) -> CoreResult<Option<i32>> {
        self.call(|e| Ok(e.mirror.as_ref().map(Mirror::rank)))
    }

    /// What an adapter served beside this model shares with it.
    pub(super) fn adapter_base(&self) -> super::adapters::Base {
        let (jobs, tokenizer, template) = (Arc::clone(&self.jobs), self.tokenizer.clone(), self.template.clone());
        let grammars = Arc::clone(&self.grammars);
        super::adapters::Base { jobs, tokenizer, template, info: self.info.clone(), limit: self.limit(), grammars }
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
        self.check_constraint(settings)?;
        self.check_prompt(&ids)?;
        // Unbounded: the engine serves every stream at once and must not
        // wait for any one reader; a cancel or a dropped stream ends the row
        // at the next step.
        let (sink, stream) = TokenStream::unbounded_channel(cancel);
        let settings = settings.clone();
        submit(
            &self.jobs,
            Box::new(move |engine: &mut Engine| {
                let settings = engine.seeded(settings);
                engine.start_generation(ids, settings, sink)
            }),
        )?;
        Ok(stream)
    }

    /// Tokenises and checks a prompt (see [`TextModel::prepare`]).
    fn prepare_now(&self, prompt: PromptInput<'_>, settings: &GenerateSettings) -> CoreResult<PreparedPrompt> {
        let prepared = super::prepare(&self.tokenizer, &self.template, prompt, settings, self.limit())?;
        self.check_constraint(&prepared.settings)?;
        Ok(prepared)
    }

    /// Compiles the settings' constraint once, so that one that does not
    /// compile is refused here, naming what is wrong (the scheduler compiles
    /// each row's own).
    fn check_constraint(&self, settings: &GenerateSettings) -> CoreResult<()> {
        self.grammars.check(settings)
    }

    /// One stream per prompt that encoded (the others keep their error),
    /// all handed to the engine in one job.
    fn rows(
        &self,
        prompts: Vec<CoreResult<Vec<u32>>>,
        settings: &GenerateSettings,
        classify: bool,
        cancel: &CancelToken,
    ) -> CoreResult<Vec<CoreResult<TokenStream>>> {
        self.check_constraint(settings)?;
        let mut rows = Vec::new();
        let streams = prompts
            .into_iter()
            .map(|p| {
                let ids = p?;
                let (sink, stream) = TokenStream::unbounded_channel(cancel.clone());
                rows.push((ids, sink));
                Ok(stream)
            })
            .collect();
        let settings = settings.clone();
        submit(
            &self.jobs,
            Box::new(move |engine: &mut Engine| {
                let settings = engine.seeded(settings);
                engine.start_rows(rows, settings, classify)
            }),
        )?;
        Ok(streams)
    }
}

/// The measurements of a call of several rows that ran together: tokens
/// summed, the longest prefill, `wall` for the whole call.
fn aggregate(rows: &[GenerateMetrics], wall: std::time::Duration) -> GenerateMetrics {
    let prefill = rows.iter().map(|m| m.prefill_duration).max().unwrap_or_default();
    let mut m = GenerateMetrics {
        prompt_tokens: rows.iter().map(|m| m.prompt_tokens).sum(),
        cached_prompt_tokens: rows.iter().map(|m| m.cached_prompt_tokens).sum(),
        generated_tokens: rows.iter().map(|m| m.generated_tokens).sum(),
        prefill_duration: prefill,
        decode_duration: wall.saturating_sub(prefill),
        total_duration: wall,
        peak_memory_bytes: rows.iter().map(|m| m.peak_memory_bytes).max().unwrap_or(0),
        active_memory_bytes: rows.last().map_or(0, |m| m.active_memory_bytes),
        draft_tokens: rows.iter().map(|m| m.draft_tokens).sum(),
        accepted_draft_tokens: rows.iter().map(|m| m.accepted_draft_tokens).sum(),
        finish_reason: rows.last().and_then(|m| m.finish_reason),
        ..GenerateMetrics::default()
    };
    m.compute_rates();
    m
}

impl Drop for MetalModel {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl TextModel for MetalModel {
    super::prompt_methods!();

    fn classify(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> CoreResult<Vec<ClassifyResult>> {
        settings.validate()?;
        let encoded = self.encode_batch(prompts)?.into_iter().collect::<CoreResult<Vec<_>>>()?;
        let started = Instant::now();
        let streams = self.rows(encoded.into_iter().map(Ok).collect(), settings, true, &cancel)?;
        let mut results = Vec::with_capacity(streams.len());
        let mut metrics = Vec::with_capacity(streams.len());
        for stream in streams {
            let done = stream?.complete()?;
            metrics.extend(done.metrics);
            let token = done
                .tokens
                .into_iter()
                .next()
                .ok_or_else(|| CoreError::backend(NAME, "a prompt was not classified"))?;
            let logits = token.logits.clone();
            results.push(ClassifyResult { token, logits });
        }
        *lock(&self.metrics) = aggregate(&metrics, started.elapsed());
        Ok(results)
    }

    /// Runs every prompt as a row of the engine's batch, with every other
    /// generation; each row's tokens equal a run of its prompt alone. An
    /// empty or over-long prompt fails in its own result; a cancel ends every
    /// unfinished row with [`CoreError::Cancelled`], keeping its tokens.
    fn batch_generate(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> CoreResult<Vec<BatchResult>> {
        settings.validate()?;
        let encoded = self.encode_batch(prompts)?;
        let started = Instant::now();
        let streams = self.rows(encoded, settings, false, &cancel)?;
        let mut metrics = Vec::with_capacity(streams.len());
        let results = streams
            .into_iter()
            .map(|s| match s {
                Ok(mut stream) => {
                    let mut r = BatchResult::default();
                    for token in &mut stream {
                        match token {
                            Ok(token) => r.tokens.push(token),
                            Err(e) => r.error = Some(e),
                        }
                    }
                    metrics.extend(stream.metrics().copied());
                    r
                }
                Err(error) => BatchResult { tokens: Vec::new(), error: Some(error) },
            })
            .collect();
        *lock(&self.metrics) = aggregate(&metrics, started.elapsed());
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

    fn engine_load(&self) -> Option<EngineLoad> {
        Some(*lock(&self.load))
    }

    fn attention_inspector(&self) -> Option<&dyn AttentionInspector> {
        Some(self)
    }

    fn adapter_host(&self) -> Option<&dyn inference_core::AdapterHost> {
        Some(self)
    }

    fn new_session(&self) -> CoreResult<Box<dyn ChatSession>> {
        Ok(Box::new(self.session()?))
    }

    /// The engine thread is running (it ends only when the model is closed).
    fn health(&self) -> CoreResult<()> {
        match lock(&self.thread).as_ref() {
            None => Err(CoreError::Closed),
            Some(t) if t.is_finished() => Err(CoreError::backend(NAME, "the engine thread has stopped")),
            Some(_) => Ok(()),
        }
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
            e.inspect_everywhere(&ids, architecture)
        })
    }
}
