// SPDX-License-Identifier: EUPL-1.2
//! What a model's engine thread owns and runs: generation, classification,
//! batches, attention inspection and adapter swaps. Every job arrives over
//! the channel of [`super::MetalModel`] and runs here, one after another.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::field::Empty;

use inference_core::{
    AttentionSnapshot, BatchResult, CancelToken, ClassifyResult, Error as CoreError, GenerateMetrics, GenerateSettings,
    LogitsMode, Result as CoreResult, Token, TokenSink,
};
use mlx::{Array, Error, ops};

use super::mirror::Mirror;
use super::mirror::Request as MirrorRequest;
use super::scheduler::{Group, Request, Scheduler, sampler_for};
use super::text::{TextOut, with_scores};
use super::{MAX_BATCH, NAME, core_err, lock};
use crate::batch;
use crate::cache::LayerCache;
use crate::generate::{self, GenerationStats, LoopOptions, Step};
use crate::model::{self, LoadedModel};
use crate::sample::Sampler;
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
}

impl Engine {
    /// Starts a generation: handed to the scheduler, which batches it with
    /// every other one. A tensor-parallel rank runs it to the end now, one
    /// after another, as every rank must run the same steps.
    pub(super) fn start_generation(&mut self, ids: Vec<u32>, settings: GenerateSettings, sink: TokenSink) {
        if self.mirror.is_some() {
            if let Err(e) = self.announce(|| MirrorRequest::Generate { ids: ids.clone(), settings: settings.clone() }) {
                return sink.fail(e);
            }
            return self.generate_into(&ids, &settings, sink);
        }
        let max_tokens = self.max_tokens(ids.len(), &settings);
        let span = generation_span(ids.len(), &settings);
        let session = None;
        self.scheduler.submit(Request { ids, settings, max_tokens, sink, span, classify: false, group: None, session });
    }

    /// Starts one row per prompt of a classification (`classify`: one token
    /// each, as drawn) or a batch, each with its sink; the rows run with
    /// every other generation. A tensor-parallel rank runs the call to the
    /// end now, batched as before, and hands each row its result.
    pub(super) fn start_rows(
        &mut self,
        rows: Vec<(Vec<u32>, TokenSink)>,
        settings: GenerateSettings,
        classify: bool,
        cancel: &CancelToken,
    ) {
        if self.mirror.is_some() {
            return self.run_rows_mirrored(rows, &settings, classify, cancel);
        }
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

    /// [`Engine::start_rows`] on a tensor-parallel rank: the whole call now, every rank in step.
    fn run_rows_mirrored(
        &mut self,
        rows: Vec<(Vec<u32>, TokenSink)>,
        settings: &GenerateSettings,
        classify: bool,
        cancel: &CancelToken,
    ) {
        let (prompts, sinks): (Vec<Vec<u32>>, Vec<TokenSink>) = rows.into_iter().unzip();
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let row_metrics = |i: usize, generated_tokens: usize| GenerateMetrics {
            prompt_tokens: lens[i],
            generated_tokens,
            ..GenerateMetrics::default()
        };
        let request = || match classify {
            true => MirrorRequest::Classify { prompts: prompts.clone(), settings: settings.clone() },
            false => MirrorRequest::Batch {
                prompts: prompts.iter().cloned().map(Some).collect(),
                settings: settings.clone(),
            },
        };
        if let Err(e) = self.announce(request) {
            for sink in sinks {
                sink.fail(CoreError::backend(NAME, e.to_string()));
            }
            return;
        }
        if classify {
            match self.classify(&prompts, settings, cancel) {
                Ok(results) => {
                    for (i, (sink, r)) in sinks.into_iter().zip(results).enumerate() {
                        let _ = sink.send(r.token);
                        sink.finish(row_metrics(i, 1));
                    }
                }
                Err(e) => {
                    for sink in sinks {
                        sink.fail(if e.is_cancelled() {
                            CoreError::Cancelled
                        } else {
                            CoreError::backend(NAME, e.to_string())
                        });
                    }
                }
            }
            return;
        }
        let results = self.batch_generate(prompts.into_iter().map(Ok).collect(), settings, cancel);
        for (i, (sink, r)) in sinks.into_iter().zip(results).enumerate() {
            let n = r.tokens.len();
            for t in r.tokens {
                let _ = sink.send(t);
            }
            match r.error {
                Some(e) => sink.fail(e),
                None => sink.finish(row_metrics(i, n)),
            }
        }
    }

    /// Whether the scheduler has nothing to do.
    pub(super) fn is_idle(&self) -> bool {
        self.scheduler.is_idle()
    }

    /// One step of the scheduler; sessions whose turns ended get their caches
    /// back, and jobs waiting for the generations before them run once those
    /// have ended.
    pub(super) fn step(&mut self) {
        self.scheduler.step(self.loaded.model.as_ref(), &self.tokenizer, &self.metrics);
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

    /// Before a job runs: rows whose streams were cancelled leave first.
    pub(super) fn before_job(&mut self) {
        self.scheduler.retire_cancelled(&self.metrics);
        self.take_back_sessions();
    }

    /// The most tokens to generate after `context` tokens of prompt.
    pub(super) fn max_tokens(&self, context: usize, settings: &GenerateSettings) -> usize {
        match self.context_length {
            Some(ctx) => settings.max_tokens.min(ctx.saturating_sub(context)),
            None => settings.max_tokens,
        }
    }

    /// Generates into a token stream (on the engine thread).
    pub(super) fn generate_into(&mut self, ids: &[u32], settings: &GenerateSettings, sink: TokenSink) {
        match self.generate_once(ids, settings, &sink) {
            Ok(m) => sink.finish(m),
            Err(e) => sink.fail(e),
        }
    }

    pub(super) fn generate_once(
        &mut self,
        ids: &[u32],
        settings: &GenerateSettings,
        sink: &TokenSink,
    ) -> CoreResult<GenerateMetrics> {
        let span = generation_span(ids.len(), settings);
        let _job = span.enter();
        let stats = self.run_generation(ids, 0, settings, sink, None).map_err(core_err)?;
        span.record("generated_tokens", stats.generated_tokens);
        let m = metrics_from(&stats);
        *lock(&self.metrics) = m;
        Ok(m)
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

    /// Swaps the LoRA adapter (see [`MetalModel::set_adapter`]).
    pub(super) fn set_adapter(&mut self, dir: Option<PathBuf>) -> CoreResult<()> {
        let adapter = dir
            .as_deref()
            .map_or(tracing::field::display(Path::new("none").display()), |d| tracing::field::display(d.display()));
        let _job = tracing::info_span!("job", kind = "set_adapter", adapter).entered();
        self.sessions.clear();
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

    /// Classifies in left-padded batches: one prefill, one sample at each
    /// prompt's last token.
    pub(super) fn classify(
        &mut self,
        prompts: &[Vec<u32>],
        settings: &GenerateSettings,
        cancel: &CancelToken,
    ) -> CoreResult<Vec<ClassifyResult>> {
        let _job = tracing::info_span!(
            "job",
            kind = "classify",
            prompts = prompts.len(),
            prompt_tokens = prompts.iter().map(Vec::len).sum::<usize>(),
        )
        .entered();
        let sampler = sampler_for(settings).map_err(core_err)?;
        if let Some(seed) = settings.seed {
            Sampler::seed(seed).map_err(core_err)?;
        }
        let start = Instant::now();
        mlx::memory::reset_peak_memory().map_err(core_err)?;
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
            peak_memory_bytes: mlx::memory::peak_memory().unwrap_or(0) as u64,
            active_memory_bytes: mlx::memory::active_memory().unwrap_or(0) as u64,
            ..GenerateMetrics::default()
        };
        m.compute_rates();
        *lock(&self.metrics) = m;
        out.into_iter().map(|r| r.ok_or_else(|| CoreError::backend(NAME, "a prompt was not classified"))).collect()
    }

    pub(super) fn classify_rows(
        &self,
        logits: &Array,
        sampler: &Sampler,
        mode: LogitsMode,
    ) -> Result<Vec<ClassifyResult>, Error> {
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
    pub(super) fn batch_generate(
        &mut self,
        prompts: Vec<CoreResult<Vec<u32>>>,
        settings: &GenerateSettings,
        cancel: &CancelToken,
    ) -> Vec<BatchResult> {
        let span = tracing::info_span!(
            "job",
            kind = "batch",
            prompts = prompts.len(),
            prompt_tokens = prompts.iter().map(|p| p.as_ref().map_or(0, Vec::len)).sum::<usize>(),
            max_tokens = settings.max_tokens,
            generated_tokens = Empty,
        );
        let _job = span.enter();
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
            let mut outs: Vec<TextOut> = rows.iter().map(|_| TextOut::new(&tokenizer, settings)).collect();
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
        span.record("generated_tokens", total.generated_tokens);
        let mut m = GenerateMetrics {
            prompt_tokens: total.prompt_tokens,
            generated_tokens: total.generated_tokens,
            prefill_duration: total.prefill,
            decode_duration: total.decode,
            total_duration: start.elapsed(),
            peak_memory_bytes: total.peak_memory as u64,
            active_memory_bytes: mlx::memory::active_memory().unwrap_or(0) as u64,
            ..GenerateMetrics::default()
        };
        m.compute_rates();
        *lock(&self.metrics) = m;
        results
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

pub(super) fn metrics_from(stats: &GenerationStats) -> GenerateMetrics {
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
