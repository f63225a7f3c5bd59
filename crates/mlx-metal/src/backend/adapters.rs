// SPDX-License-Identifier: EUPL-1.2
//! LoRA adapters served beside a loaded model ([`AdapterHost`]): each is a
//! model of its own, [`MetalAdapter`], that runs on the base model's engine
//! thread with the base model's weights.
//!
//! The engine keeps one model. An adapter served beside it is its LoRA
//! layers, one slot per linear layer (`lora::read_adapter`), and a
//! [`Scheduler`] of its own; its requests batch with each other, never with
//! the base model's or another adapter's. Each engine step runs the base
//! model's batch, then each busy adapter's in turn: its slots are swapped
//! into the model's linear layers, its scheduler steps (building that step's
//! graph, which holds its own references to the arrays it reads), and the
//! slots are swapped out again. So the base weights exist once, whatever
//! the number of adapters; each adapter adds its `A` and `B` matrices and
//! the KV caches of its own rows. The fused decode projections stay in
//! place: a part that carries an adapter runs on its own (`model/layers.rs`).
//!
//! An adapter's batch takes the engine's limits (`max_batch`, `prefill_step`,
//! the KV budget) for itself, without a prompt cache. It is the raw base model
//! plus this adapter, whatever adapter the base model itself carries.
//! Closing an adapter's model refuses new requests at once; its running
//! generations finish, and its weights and batch go when the last has.
//! Not with tensor parallelism (the other ranks would need every adapter).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use inference_core::{
    AdapterHost, BatchResult, CancelToken, ClassifyResult, EngineLoad, Error as CoreError, GenerateMetrics,
    GenerateSettings, ModelInfo, PreparedPrompt, PromptInput, Result as CoreResult, TextModel, TokenSink, TokenStream,
};
use mlx::Error;

use super::engine::Engine;
use super::scheduler::{Limits, Request, Scheduler};
use super::{Jobs, NAME, call, check_prompt, core_err, lock, submit};
use crate::chat::ChatTemplate;
use crate::lora::LoraLayer;
use crate::model::LanguageModel;
use crate::tokenizer::Tokenizer;

/// The adapters the engine serves beside its model.
pub(crate) struct Variants {
    /// The limits of each adapter's batch (the engine's, without a prompt cache).
    limits: Limits,
    list: Vec<Variant>,
    next_id: u64,
}

/// One adapter: its layers and its batch.
struct Variant {
    id: u64,
    /// One per layer of `linears_in_place`; swapped with the model's around each step.
    slots: Vec<Option<LoraLayer>>,
    scheduler: Scheduler,
    /// The last generation's measurements (the adapter model's `metrics()`).
    metrics: Arc<Mutex<GenerateMetrics>>,
    /// Closed: no new requests; removed once its scheduler is idle.
    closing: bool,
}

impl Variants {
    /// No adapters yet; each one's batch will have `limits`, less the prompt cache.
    pub(crate) fn new(limits: Limits) -> Variants {
        Variants { limits: Limits { prompt_cache_bytes: Some(0), ..limits }, list: Vec::new(), next_id: 1 }
    }

    /// Whether no adapter has anything to do.
    pub(crate) fn is_idle(&self) -> bool {
        self.list.iter().all(|v| v.scheduler.is_idle())
    }
}

/// Swaps `slots` with the model's adapters (twice restores both).
fn swap_slots(model: &mut dyn LanguageModel, slots: &mut [Option<LoraLayer>]) {
    for ((_, linear), slot) in model.linears_in_place().into_iter().zip(slots.iter_mut()) {
        std::mem::swap(&mut linear.lora, slot);
    }
}

/// An adapter's slots swapped into the model for as long as it lives.
struct Swapped<'a> {
    model: &'a mut dyn LanguageModel,
    slots: &'a mut [Option<LoraLayer>],
}

impl<'a> Swapped<'a> {
    fn new(model: &'a mut dyn LanguageModel, slots: &'a mut [Option<LoraLayer>]) -> Self {
        swap_slots(model, slots);
        Swapped { model, slots }
    }
}

impl Drop for Swapped<'_> {
    fn drop(&mut self) {
        swap_slots(self.model, self.slots);
    }
}

/// A bad adapter directory is the caller's error (named `adapter_path`); the rest are the engine's.
fn adapter_err(dir: &Path, e: Error) -> CoreError {
    match e {
        Error::Io { .. } | Error::Format { .. } | Error::InvalidArgument { .. } => {
            CoreError::invalid_setting("adapter_path", dir.display(), e.to_string())
        }
        e => core_err(e),
    }
}

impl Engine {
    /// Reads the adapter in `dir` and serves it beside the model; returns its id.
    fn add_variant(
        &mut self,
        dir: &Path,
        load: Arc<Mutex<EngineLoad>>,
        metrics: Arc<Mutex<GenerateMetrics>>,
    ) -> CoreResult<u64> {
        let _job = tracing::info_span!("job", kind = "add_adapter", adapter = %dir.display()).entered();
        if self.mirror.is_some() {
            return Err(CoreError::unsupported(NAME, "serving adapters beside a tensor-parallel model"));
        }
        let (_, slots) = crate::lora::read_adapter(self.loaded.model.as_mut(), dir).map_err(|e| adapter_err(dir, e))?;
        let mut scheduler = Scheduler::new(self.variants.limits, load, false, self.scheduler.grammars());
        scheduler.size_up(self.loaded.model.as_ref()).map_err(core_err)?;
        let id = self.variants.next_id;
        self.variants.next_id += 1;
        self.variants.list.push(Variant { id, slots, scheduler, metrics, closing: false });
        Ok(id)
    }

    /// Hands a generation to adapter `id`'s batch.
    fn start_variant_generation(&mut self, id: u64, ids: Vec<u32>, settings: GenerateSettings, sink: TokenSink) {
        if let Err(e) = self.check_fits(ids.len(), &settings) {
            return sink.fail(e);
        }
        let max_tokens = self.max_tokens(ids.len(), &settings);
        let Some(variant) = self.variants.list.iter_mut().find(|v| v.id == id && !v.closing) else {
            return sink.fail(CoreError::Closed);
        };
        let span = tracing::info_span!(
            "job",
            kind = "generate",
            adapter = id,
            prompt_tokens = ids.len(),
            max_tokens = settings.max_tokens,
            generated_tokens = tracing::field::Empty,
        );
        let request = Request { ids, settings, max_tokens, sink, span, classify: false, group: None, session: None };
        variant.scheduler.submit(request);
    }

    /// Refuses adapter `id` new requests; it goes once its running ones have finished.
    fn close_variant(&mut self, id: u64) {
        if let Some(v) = self.variants.list.iter_mut().find(|v| v.id == id) {
            v.closing = true;
        }
        self.variants.list.retain(|v| !(v.closing && v.scheduler.is_idle()));
    }

    /// One step of every busy adapter's batch, each with its layers swapped in.
    pub(super) fn step_variants(&mut self) {
        if self.variants.list.is_empty() {
            return;
        }
        let model = self.loaded.model.as_mut();
        for v in self.variants.list.iter_mut().filter(|v| !v.scheduler.is_idle()) {
            // Swapped out again when the guard goes, a panic in the step included.
            let swapped = Swapped::new(&mut *model, &mut v.slots);
            let plan = v.scheduler.plan();
            v.scheduler.step(&plan, &*swapped.model, &self.tokenizer, &v.metrics);
        }
        self.variants.list.retain(|v| !(v.closing && v.scheduler.is_idle()));
    }

    /// Ends every adapter's generations with `message` (see [`Scheduler::fail_all`]).
    pub(super) fn fail_variants(&mut self, message: &str) {
        for v in &mut self.variants.list {
            v.scheduler.fail_all(message, &v.metrics);
        }
    }
}

/// What an adapter's model shares with its base model's handle.
pub(super) struct Base {
    pub(super) jobs: Jobs,
    pub(super) tokenizer: Tokenizer,
    pub(super) template: ChatTemplate,
    pub(super) info: ModelInfo,
    /// The longest prompt, in tokens.
    pub(super) limit: Option<usize>,
    /// The model's constraint compiler.
    pub(super) grammars: Arc<crate::constrain::Grammars>,
}

/// A LoRA adapter served beside a [`MetalModel`](super::MetalModel): the
/// base model's weights with the adapter's update, on the base model's
/// engine thread (see the module documentation). Closing or dropping it
/// unloads the adapter once its running generations have finished.
pub struct MetalAdapter {
    id: u64,
    dir: PathBuf,
    base: Base,
    metrics: Arc<Mutex<GenerateMetrics>>,
    load: Arc<Mutex<EngineLoad>>,
    closed: AtomicBool,
}

impl MetalAdapter {
    /// Loads the adapter in `dir` beside the model `base` belongs to.
    pub(super) fn load(base: Base, dir: &Path) -> CoreResult<MetalAdapter> {
        let metrics = Arc::new(Mutex::new(GenerateMetrics::default()));
        let load = Arc::new(Mutex::new(EngineLoad::default()));
        let (engine_metrics, engine_load, engine_dir) = (Arc::clone(&metrics), Arc::clone(&load), dir.to_path_buf());
        let id = call(&base.jobs, move |e| e.add_variant(&engine_dir, engine_load, engine_metrics))?;
        Ok(MetalAdapter { id, dir: dir.to_path_buf(), base, metrics, load, closed: AtomicBool::new(false) })
    }

    /// The adapter directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn prepare_now(&self, prompt: PromptInput<'_>, settings: &GenerateSettings) -> CoreResult<PreparedPrompt> {
        super::prepare(&self.base.tokenizer, &self.base.template, prompt, settings, self.base.limit)
    }

    fn stream(&self, ids: Vec<u32>, settings: &GenerateSettings, cancel: CancelToken) -> CoreResult<TokenStream> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(CoreError::Closed);
        }
        settings.validate()?;
        self.base.grammars.check(settings)?;
        check_prompt(&ids, self.base.limit)?;
        let (sink, stream) = TokenStream::unbounded_channel(cancel);
        let (settings, id) = (settings.clone(), self.id);
        submit(
            &self.base.jobs,
            Box::new(move |engine: &mut Engine| {
                let settings = engine.seeded(settings);
                engine.start_variant_generation(id, ids, settings, sink)
            }),
        )?;
        Ok(stream)
    }
}

impl TextModel for MetalAdapter {
    super::prompt_methods!();

    fn classify(&self, _: &[&str], _: &GenerateSettings, _: CancelToken) -> CoreResult<Vec<ClassifyResult>> {
        Err(CoreError::unsupported(NAME, "classification with an adapter served beside its model"))
    }

    /// Every prompt is a row of the adapter's batch.
    fn batch_generate(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> CoreResult<Vec<BatchResult>> {
        settings.validate()?;
        let started = Instant::now();
        let streams: Vec<CoreResult<TokenStream>> =
            prompts.iter().map(|p| self.generate(p, settings, cancel.clone())).collect();
        let results = streams
            .into_iter()
            .map(|s| match s {
                Ok(stream) => stream.into_batch_result(),
                Err(error) => BatchResult { tokens: Vec::new(), error: Some(error) },
            })
            .collect();
        tracing::debug!(prompts = prompts.len(), seconds = started.elapsed().as_secs_f64(), "adapter batch");
        Ok(results)
    }

    fn info(&self) -> ModelInfo {
        self.base.info.clone()
    }

    fn metrics(&self) -> GenerateMetrics {
        *lock(&self.metrics)
    }

    fn model_type(&self) -> &str {
        &self.base.info.architecture
    }

    fn engine_load(&self) -> Option<EngineLoad> {
        Some(*lock(&self.load))
    }

    /// Refuses new requests and lets the running ones finish; the adapter's
    /// weights go with the last of them. Idempotent.
    fn close(&self) -> CoreResult<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let id = self.id;
        match submit(&self.base.jobs, Box::new(move |engine: &mut Engine| engine.close_variant(id))) {
            // The base model closed first: its engine, and this adapter with it, are gone.
            Ok(()) | Err(CoreError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for MetalAdapter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl AdapterHost for super::MetalModel {
    fn load_adapter(&self, dir: &Path) -> CoreResult<Box<dyn TextModel>> {
        Ok(Box::new(MetalAdapter::load(self.adapter_base(), dir)?))
    }
}
