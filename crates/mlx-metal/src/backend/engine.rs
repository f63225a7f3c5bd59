// SPDX-License-Identifier: EUPL-1.2
//! What a model's engine thread owns and runs: the scheduler that every
//! generation goes through (generate, chat, classification, batches,
//! session turns), attention inspection and adapter swaps. Every job
//! arrives over the channel of [`super::MetalModel`] and runs here, between
//! the scheduler's steps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::field::Empty;

use inference_core::{
    AttentionSnapshot, Error as CoreError, GenerateMetrics, GenerateSettings, Result as CoreResult, TokenSink,
};
use mlx::{Array, Error};

use super::mirror::Mirror;
use super::mirror::Request as MirrorRequest;
use super::scheduler::{Group, Plan, Request, Scheduler};
use super::{NAME, core_err};
use crate::model::{self, LoadedModel};
use crate::session::{Fingerprint, SessionCache};
use crate::tokenizer::Tokenizer;

/// What the engine thread owns.
pub(crate) struct Engine {
    pub(super) loaded: LoadedModel,
    pub(super) tokenizer: Tokenizer,
    pub(super) metrics: Arc<Mutex<GenerateMetrics>>,
    pub(super) context_length: Option<usize>,
    pub(super) fingerprint: Fingerprint,
    pub(super) sessions: HashMap<u64, SessionCache>,
    /// Set when this process is one rank of a tensor-parallel job.
    pub(super) mirror: Option<Mirror>,
    /// Every generation in flight (single process).
    pub(super) scheduler: Scheduler,
    /// Sessions whose turn is running: their state (caches out with the
    /// turn) and the jobs on them that wait for it to end.
    pub(super) turns: HashMap<u64, (SessionCache, Vec<super::Job>)>,
    /// Jobs that wait until every generation submitted before them has ended.
    pub(super) after_drain: Vec<super::Job>,
    /// The adapters served beside the model, each with its own batch (`adapters.rs`).
    pub(super) variants: super::adapters::Variants,
}

impl Engine {
    /// Starts a generation: handed to the scheduler, which batches it with
    /// every other one (and, in a tensor-parallel job, announced to the
    /// other ranks first).
    pub(super) fn start_generation(&mut self, ids: Vec<u32>, settings: GenerateSettings, sink: TokenSink) {
        if let Err(e) = self.check_fits(ids.len(), &settings) {
            return sink.fail(e);
        }
        if let Err(e) = self.announce(|| MirrorRequest::Generate { ids: ids.clone(), settings: settings.clone() }) {
            return sink.fail(e);
        }
        self.submit_generation(ids, settings, sink);
    }

    /// Hands a generation to the scheduler.
    pub(super) fn submit_generation(&mut self, ids: Vec<u32>, settings: GenerateSettings, sink: TokenSink) {
        let max_tokens = self.max_tokens(ids.len(), &settings);
        let span = generation_span(ids.len(), &settings);
        let session = None;
        self.scheduler.submit(Request { ids, settings, max_tokens, sink, span, classify: false, group: None, session });
    }

    /// Starts one row per prompt of a classification (`classify`: one token
    /// each, as drawn) or a batch, each with its sink; the rows run with
    /// every other generation.
    pub(super) fn start_rows(&mut self, rows: Vec<(Vec<u32>, TokenSink)>, settings: GenerateSettings, classify: bool) {
        let mut fitting = Vec::with_capacity(rows.len());
        for (ids, sink) in rows {
            let fits =
                if classify { self.scheduler.check_fits(ids.len() + 1) } else { self.check_fits(ids.len(), &settings) };
            match fits {
                Ok(()) => fitting.push((ids, sink)),
                Err(e) => sink.fail(e),
            }
        }
        let rows = fitting;
        let request = || {
            let (prompts, settings) = (rows.iter().map(|(ids, _)| ids.clone()).collect(), settings.clone());
            if classify {
                MirrorRequest::Classify { prompts, settings }
            } else {
                MirrorRequest::Batch { prompts, settings }
            }
        };
        if let Err(e) = self.announce(request) {
            for (_, sink) in rows {
                sink.fail(CoreError::backend(NAME, e.to_string()));
            }
            return;
        }
        self.submit_rows(rows, settings, classify);
    }

    /// Hands the rows of a classification or a batch to the scheduler, under one `job` span.
    pub(super) fn submit_rows(&mut self, rows: Vec<(Vec<u32>, TokenSink)>, settings: GenerateSettings, classify: bool) {
        let kind = if classify { "classify" } else { "batch" };
        let span = tracing::info_span!(
            "job",
            kind,
            prompts = rows.len(),
            prompt_tokens = rows.iter().map(|(ids, _)| ids.len()).sum::<usize>(),
            max_tokens = settings.max_tokens,
            generated_tokens = Empty,
        );
        let group = Group::new(span);
        for (index, (ids, sink)) in rows.into_iter().enumerate() {
            let max_tokens = if classify { 1 } else { self.max_tokens(ids.len(), &settings) };
            let span = tracing::info_span!(parent: group.span(), "row", index, prompt_tokens = ids.len());
            let group = Some(Arc::clone(&group));
            let settings = settings.clone();
            self.scheduler.submit(Request { ids, settings, max_tokens, sink, span, classify, group, session: None });
        }
    }

    /// Refuses a generation from `prompt` positions whose KV cache could
    /// never fit the engine's budget.
    pub(super) fn check_fits(&self, prompt: usize, settings: &GenerateSettings) -> CoreResult<()> {
        self.scheduler.check_fits(prompt + self.max_tokens(prompt, settings))
    }

    /// Whether the scheduler, and every adapter's, has nothing to do.
    pub(super) fn is_idle(&self) -> bool {
        self.scheduler.is_idle() && self.variants.is_idle()
    }

    /// One step of the scheduler; sessions whose turns ended get their caches
    /// back, and jobs waiting for the generations before them run once those
    /// have ended.
    pub(super) fn step(&mut self) {
        // Only the adapters served beside the model may be busy (see `adapters.rs`).
        if !self.scheduler.is_idle() || !self.after_drain.is_empty() {
            let plan = self.scheduler.plan();
            // Every rank runs rank 0's plan.
            if let Err(e) = self.announce(|| MirrorRequest::Step { plan: plan.clone() }) {
                tracing::error!(error = %e.report(), "could not send a step to the other tensor-parallel ranks");
            }
            self.run_step(&plan);
        }
        self.step_variants();
    }

    /// One scheduler step of `plan`, and what follows it. In a tensor-parallel
    /// job the ranks agree on the admitted requests that could not start on
    /// any of them before anything runs, and every rank ends those.
    pub(super) fn run_step(&mut self, plan: &Plan) {
        let refused = self.scheduler.begin_step(plan, self.loaded.model.as_ref(), &self.tokenizer);
        if plan.admit > 0 {
            self.agree_on_admission(&refused);
        }
        self.scheduler.finish_step(self.loaded.model.as_ref(), &self.metrics);
        self.take_back_sessions();
        if !self.after_drain.is_empty() && self.scheduler.drained() {
            for job in std::mem::take(&mut self.after_drain) {
                job(self);
            }
            self.scheduler.release();
        }
    }

    /// Runs `job` once every generation submitted before it has ended (new
    /// ones wait meanwhile): for jobs that change the model under them.
    pub(super) fn after_drain(&mut self, job: super::Job) {
        if self.after_drain.is_empty() && self.scheduler.drained() {
            return job(self);
        }
        self.scheduler.hold();
        self.after_drain.push(job);
    }

    /// Before a job runs: rows whose streams were cancelled leave first (on
    /// every rank of a tensor-parallel job).
    pub(super) fn before_job(&mut self) {
        let cancel = self.scheduler.plan().cancel;
        if cancel.is_empty() {
            return;
        }
        if let Err(e) = self.announce(|| MirrorRequest::Cancel { generations: cancel.clone() }) {
            tracing::error!(error = %e.report(), "could not send a cancel to the other tensor-parallel ranks");
        }
        self.retire(&cancel);
    }

    /// Ends the generations in `cancel` now (see [`Plan`]).
    pub(super) fn retire(&mut self, cancel: &[u64]) {
        self.scheduler.retire(cancel, &self.metrics);
        self.take_back_sessions();
    }

    /// The most tokens to generate after `context` tokens of prompt.
    pub(super) fn max_tokens(&self, context: usize, settings: &GenerateSettings) -> usize {
        match self.context_length {
            Some(ctx) => settings.max_tokens.min(ctx.saturating_sub(context)),
            None => settings.max_tokens,
        }
    }

    /// Swaps the LoRA adapter (see [`MetalModel::set_adapter`]).
    pub(super) fn set_adapter(&mut self, dir: Option<PathBuf>) -> CoreResult<()> {
        let adapter = dir
            .as_deref()
            .map_or(tracing::field::display(Path::new("none").display()), |d| tracing::field::display(d.display()));
        let _job = tracing::info_span!("job", kind = "set_adapter", adapter).entered();
        self.sessions.clear();
        self.scheduler.clear_prompt_cache(&dir.as_deref().map_or(String::new(), |d| d.display().to_string()));
        let model = self.loaded.model.as_mut();
        crate::lora::remove_lora(model);
        if let Some(dir) = dir {
            crate::lora::load_adapter(model, &dir).map_err(core_err)?;
        }
        // Layers without an adapter run their decode projections fused again.
        model.fuse_projections().map_err(core_err)
    }

    pub(super) fn inspect(&mut self, ids: &[u32], architecture: String) -> Result<AttentionSnapshot, Error> {
        let _job = tracing::info_span!("job", kind = "inspect", prompt_tokens = ids.len()).entered();
        let model = self.loaded.model.as_ref();
        let mut caches = model.make_cache()?;
        let x: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let x = Array::from_slice(&x, &[1, x.len() as i32])?;
        let (logits, taps) = model::AttentionTaps::capture(|| model.forward(&x, &mut caches))?;
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
}

/// The `job` span of one generation (a child of the caller's span); its
/// `generated_tokens` is recorded when it ends.
fn generation_span(prompt_tokens: usize, settings: &GenerateSettings) -> tracing::Span {
    tracing::info_span!(
        "job",
        kind = "generate",
        prompt_tokens,
        max_tokens = settings.max_tokens,
        generated_tokens = Empty,
    )
}

/// `[1, H, L, D]` → per head, `L * D` values.
fn per_head(a: &Array) -> Result<Vec<Vec<f32>>, Error> {
    let shape = a.shape();
    let (heads, len) = (shape[1] as usize, (shape[2] * shape[3]) as usize);
    let flat = a.to_vec_f32()?;
    Ok((0..heads).map(|h| flat[h * len..(h + 1) * len].to_vec()).collect())
}
