// SPDX-License-Identifier: EUPL-1.2
//! Batched prefill and generation for prompts of different lengths.
//!
//! Prompts are left-padded to a common length and run as one `[B, L]`
//! batch over [`BatchKvCache`]s. Each row keeps its own positions (its rope
//! offsets count from its first real token) and its masks hide the padding,
//! so every row computes what it would compute alone: greedy tokens equal a
//! sequential run of each prompt. Rows that finish are dropped from the batch
//! (and the padding no row needs any more with them), so the others go on at
//! the cost of a smaller batch.
//!
//! Sampling with a temperature draws all rows from one random key per step,
//! so seeded samples differ from seeded sequential runs; greedy ones do not.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::cache::{BatchKvCache, LayerCache};
use crate::generate::{Step, read_ids};
use crate::model::LanguageModel;
use crate::sample::Sampler;
use mlx::memory;
use mlx::ops;
use mlx::transforms::async_eval;
use mlx::{Array, Dtype};
use mlx::{Error, Result};

/// Timings and counts of one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchStats {
    /// Rows in the batch.
    pub rows: usize,
    /// Real prompt tokens (padding not counted).
    pub prompt_tokens: usize,
    /// Tokens handed out, all rows together.
    pub generated_tokens: usize,
    /// From the start until the first tokens were known.
    pub prefill: Duration,
    /// From the first tokens until the end.
    pub decode: Duration,
    /// Peak MLX memory during the call.
    pub peak_memory: usize,
    /// Whether the call stopped because it was cancelled.
    pub cancelled: bool,
}

/// A left-padded batch after its prefill.
pub struct Prefilled {
    /// One [`LayerCache::Batch`] per layer.
    pub caches: Vec<LayerCache>,
    /// The logits at each row's last prompt token, `[B, V]` (lazy).
    pub logits: Array,
}

fn check_prompts(op: &'static str, prompts: &[&[u32]]) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::invalid(op, "the batch has no prompts"));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::invalid(op, format!("prompt {i} of the batch has no tokens")));
    }
    Ok(())
}

/// Left-pads `prompts` into an int32 `[B, L]` array; returns it and the padding per row.
fn pad_left(prompts: &[&[u32]]) -> Result<(Array, Vec<i32>)> {
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(width * prompts.len());
    let mut padding = Vec::with_capacity(prompts.len());
    for p in prompts {
        let pad = width - p.len();
        padding.push(i32::try_from(pad).map_err(|_| Error::invalid("batch", "the prompts are too long"))?);
        flat.extend(std::iter::repeat_n(0i32, pad));
        for &t in *p {
            flat.push(i32::try_from(t).map_err(|_| Error::invalid("batch", format!("token id {t} is too large")))?);
        }
    }
    let dims = [prompts.len() as i32, width as i32];
    Ok((Array::from_slice(&flat, &dims)?, padding))
}

/// Runs `prompts` through the model as one left-padded batch, in chunks of
/// `prefill_step` columns, and returns the caches and the logits at each
/// row's last token. Returns `Ok(None)` when `cancelled` says so between
/// chunks.
pub fn prefill(
    model: &dyn LanguageModel,
    prompts: &[&[u32]],
    prefill_step: usize,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<Prefilled>> {
    check_prompts("batch_prefill", prompts)?;
    let (tokens, padding) = pad_left(prompts)?;
    let layers = model.make_cache()?.len();
    let mut caches =
        (0..layers).map(|_| BatchKvCache::new(padding.clone()).map(LayerCache::Batch)).collect::<Result<Vec<_>>>()?;
    let width = tokens.dim(1)?;
    let step = i32::try_from(prefill_step.max(1)).unwrap_or(i32::MAX);
    let mut done = 0;
    while width - done > 1 {
        if cancelled() {
            return Ok(None);
        }
        let n = step.min(width - done - 1);
        let chunk = ops::slice_axis(&tokens, 1, done, done + n)?;
        crate::generate::prefill_chunk(model, &chunk, &mut caches)?;
        done += n;
        memory::clear_cache()?;
    }
    let last = ops::slice_axis(&tokens, 1, done, width)?;
    let logits = crate::generate::last_position(&model.forward(&last, &mut caches)?)?;
    Ok(Some(Prefilled { caches, logits }))
}

/// The rows still generating: their caller-side indices, per-row histories
/// (for the repetition penalty) and the pending step's outputs.
struct Rows {
    ids: Vec<usize>,
    history: Vec<Array>,
}

impl Rows {
    /// Processes `logits: [B, V]` row by row (repetition penalty), then
    /// samples: returns `(tokens [B], logprobs [B, V], logits [B, V])`.
    fn sample(&mut self, logits: Array, sampler: &Sampler, fed: Option<&Array>) -> Result<(Array, Array, Array)> {
        let logits = if sampler.needs_history() {
            let mut processed = Vec::with_capacity(self.ids.len());
            for (i, h) in self.history.iter_mut().enumerate() {
                if let Some(fed) = fed {
                    let tok = ops::slice_axis(fed, 0, i as i32, i as i32 + 1)?;
                    *h = ops::concatenate(&[&*h, &tok], 0)?;
                }
                let row = ops::slice_axis(&logits, 0, i as i32, i as i32 + 1)?;
                processed.push(sampler.process_history(&row, h)?);
            }
            let refs: Vec<&Array> = processed.iter().collect();
            ops::concatenate(&refs, 0)?
        } else {
            logits
        };
        let logprobs = Sampler::logprobs(&logits)?;
        let y = sampler.sample(&logprobs)?;
        Ok((y, logprobs, logits))
    }

    /// Keeps the rows at positions `keep`.
    fn retain(&mut self, keep: &[usize]) {
        self.ids = keep.iter().map(|&k| self.ids[k]).collect();
        if !self.history.is_empty() {
            self.history = keep.iter().map(|&k| self.history[k].clone()).collect();
        }
    }
}

fn take_rows(a: &Array, keep: &[usize]) -> Result<Array> {
    let idx: Vec<i32> = keep.iter().map(|&k| k as i32).collect();
    ops::take(a, &Array::from_vec(&idx)?, 0)
}

/// Generates a continuation of every prompt as one batch.
///
/// `max_tokens[i]` bounds row `i`. `emit(i, step)` gets row `i`'s tokens in
/// order as soon as they are known and says whether the row goes on;
/// `cancelled` is polled between prefill chunks and before each step's
/// tokens are handed out (the stats say whether it stopped the batch).
pub fn generate(
    model: &dyn LanguageModel,
    prompts: &[&[u32]],
    sampler: &Sampler,
    max_tokens: &[usize],
    prefill_step: usize,
    cancelled: &dyn Fn() -> bool,
    mut emit: impl FnMut(usize, Step<'_>) -> Result<ControlFlow<()>>,
) -> Result<BatchStats> {
    check_prompts("batch_generate", prompts)?;
    if max_tokens.len() != prompts.len() {
        return Err(Error::invalid(
            "batch_generate",
            format!("{} prompts but {} token limits", prompts.len(), max_tokens.len()),
        ));
    }
    let span = tracing::debug_span!(
        "batch_generate",
        rows = prompts.len(),
        prompt_tokens = tracing::field::Empty,
        generated_tokens = tracing::field::Empty,
    );
    let _batch = span.enter();
    let start = Instant::now();
    memory::reset_peak_memory()?;
    let mut stats = BatchStats {
        rows: prompts.len(),
        prompt_tokens: prompts.iter().map(|p| p.len()).sum(),
        ..BatchStats::default()
    };
    span.record("prompt_tokens", stats.prompt_tokens);
    let finish = |mut s: BatchStats, first: Option<Instant>| {
        span.record("generated_tokens", s.generated_tokens);
        let end = Instant::now();
        let first = first.unwrap_or(end);
        s.prefill = first - start;
        s.decode = end - first;
        s.peak_memory = memory::peak_memory().unwrap_or(0);
        s
    };
    let Some(Prefilled { mut caches, logits }) = prefill(model, prompts, prefill_step, cancelled)? else {
        stats.cancelled = true;
        return Ok(finish(stats, None));
    };
    let history = if sampler.needs_history() {
        prompts
            .iter()
            .map(|p| Array::from_vec(&p.iter().map(|&t| t as i32).collect::<Vec<_>>()))
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let mut rows = Rows { ids: (0..prompts.len()).collect(), history };
    let mut produced = vec![0usize; prompts.len()];
    // Rows that may not produce anything are done before they start.
    let keep: Vec<usize> = (0..prompts.len()).filter(|&i| max_tokens[i] > 0).collect();
    if keep.is_empty() {
        return Ok(finish(stats, None));
    }
    let (mut y, mut logprobs, mut logits) = rows.sample(logits, sampler, None)?;
    if keep.len() != prompts.len() {
        for c in &mut caches {
            if let LayerCache::Batch(b) = c {
                b.filter(&keep)?;
            }
        }
        (y, logprobs, logits) = (take_rows(&y, &keep)?, take_rows(&logprobs, &keep)?, take_rows(&logits, &keep)?);
        rows.retain(&keep);
    }
    async_eval(&[&y, &logprobs])?;

    let mut first_at = None;
    let mut step_no = 0usize;
    loop {
        // Plain integers only, and nothing built unless a subscriber wants
        // TRACE: this runs once per step.
        let _step = tracing::trace_span!("decode_step", step = step_no, rows = rows.ids.len()).entered();
        // Queue the next step unless every row ends with this token.
        let more = rows.ids.iter().any(|&r| produced[r] + 1 < max_tokens[r]);
        let next = if more {
            let x = ops::reshape(&y, &[-1, 1])?;
            let out = model.forward(&x, &mut caches)?;
            let out = ops::squeeze(&out, &[1])?;
            let fed = ops::astype(&y, Dtype::Int32)?;
            let next = rows.sample(out, sampler, Some(&fed))?;
            async_eval(&[&next.0, &next.1])?;
            Some(next)
        } else {
            None
        };
        if first_at.is_none() {
            y.eval()?;
            first_at = Some(Instant::now());
        }
        if cancelled() {
            stats.cancelled = true;
            break;
        }
        let ids = read_ids("batch_generate", &y)?;
        let mut keep = Vec::with_capacity(rows.ids.len());
        for (pos, &row) in rows.ids.iter().enumerate() {
            let lp = ops::squeeze(&ops::slice_axis(&logprobs, 0, pos as i32, pos as i32 + 1)?, &[0])?;
            let lg = ops::squeeze(&ops::slice_axis(&logits, 0, pos as i32, pos as i32 + 1)?, &[0])?;
            let flow = emit(row, Step { id: ids[pos], logprobs: &lp, logits: &lg })?;
            produced[row] += 1;
            stats.generated_tokens += 1;
            if flow.is_continue() && produced[row] < max_tokens[row] {
                keep.push(pos);
            }
        }
        let Some((ny, nlp, nl)) = next else { break };
        if keep.is_empty() {
            break;
        }
        (y, logprobs, logits) = (ny, nlp, nl);
        if keep.len() != rows.ids.len() {
            for c in &mut caches {
                if let LayerCache::Batch(b) = c {
                    b.filter(&keep)?;
                }
            }
            (y, logprobs, logits) = (take_rows(&y, &keep)?, take_rows(&logprobs, &keep)?, take_rows(&logits, &keep)?);
            rows.retain(&keep);
        }
        step_no += 1;
        if step_no.is_multiple_of(256) {
            memory::clear_cache()?;
        }
    }
    Ok(finish(stats, first_at))
}
