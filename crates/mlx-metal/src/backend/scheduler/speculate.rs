// SPDX-License-Identifier: EUPL-1.2
//! Speculative decoding in the scheduler (`crate::speculative`): a step of
//! a row that decodes alone guesses up to `num_draft_tokens` tokens (prompt
//! lookup or a draft model), runs the model once on its pending token and the
//! guesses, and hands out the pending token, the accepted guesses and keeps
//! the model's next sample pending, as a plain step keeps its one.
//!
//! Only a row alone in the batch speculates, with nothing waiting to be
//! prefilled: there a step reads every weight for one token and guessing
//! trades spare compute for steps. With several rows the batch already
//! shares each weight read among them, checking `k` guesses per row would
//! multiply the step's compute by `k + 1`, and rows that accept different
//! numbers of guesses would leave the left-padded caches ragged; mlx-lm turns
//! batching off to speculate for the same reasons. When a second request
//! comes, the row goes on in the batch plainly (its caches are those of a
//! plain row) and speculates again once it is alone; a draft model's caches
//! catch up then. Rows with a repetition penalty or a constraint (whose
//! processing depends on every token before) and classifications decode
//! plainly.

use std::time::Instant;

use mlx::transforms::eval;
use mlx::{Array, Error, Result, ops};

use super::Scheduler;
use super::prefill::single_row_caches;
use super::rows::{Outputs, Row, tokens};
use crate::backend::core_err;
use crate::cache::LayerCache;
use crate::generate::read_ids;
use crate::model::LanguageModel;
use crate::sample::Sampler;
use crate::speculative::{DraftSource, DraftState, SpeculativeConfig, accepted, draft_greedy, lookup_draft};

/// What the scheduler speculates with.
pub(crate) struct Speculator {
    pub(crate) config: SpeculativeConfig,
    /// The draft model, when the config names one (loaded on the engine thread).
    pub(crate) draft: Option<Box<dyn LanguageModel>>,
}

/// Speculative decoding's running totals (the engine load's counters).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct SpecTotals {
    pub(super) steps: u64,
    pub(super) drafted: u64,
    pub(super) accepted: u64,
}

impl Scheduler {
    /// Speculates from now on with `speculator`.
    pub(crate) fn speculate_with(&mut self, speculator: Speculator) {
        self.speculator = Some(speculator);
    }

    /// Whether this step may speculate (see the module's notes).
    pub(super) fn may_speculate(&self) -> bool {
        let Some(batch) = &self.batch else { return false };
        let alone = matches!(&batch.rows[..], [row] if row_may_speculate(row));
        self.speculator.is_some() && !self.mirrored && self.prefilling.is_empty() && alone
    }

    /// One speculative step of the batch's one row. `Ok(false)` when there
    /// was nothing to guess: a plain step follows (the pending token has
    /// been read, nothing else has changed).
    pub(super) fn speculate(&mut self, model: &dyn LanguageModel) -> Result<bool> {
        let (Some(spec), Some(batch)) = (self.speculator.as_ref(), self.batch.as_mut()) else { return Ok(false) };
        let [row] = &mut batch.rows[..] else { return Ok(false) };
        let pending = read_ids("scheduler", &batch.pending.ids)?;
        let Some(&first) = pending.first() else { return Ok(false) };
        let mut context = row.context();
        context.push(first);
        // Guesses after the pending token that could still be handed out.
        let room = row.max_tokens.saturating_sub(row.produced + 1);
        let k = spec.config.num_draft_tokens.min(room);
        // Guesses from a draft model stay queued on the device: the check takes
        // them as input and one host sync reads them with its samples.
        let guesses = match &spec.config.source {
            DraftSource::PromptLookup { max_ngram } => {
                let drafts = lookup_draft(&context, *max_ngram, k);
                if drafts.is_empty() {
                    return Ok(false);
                }
                tokens(&drafts)?
            }
            DraftSource::Model(_) if k > 0 => {
                let draft = spec.draft.as_deref().ok_or_else(|| Error::invalid("speculative", "no draft model"))?;
                if row.draft.is_none() {
                    row.draft = Some((single_row_caches(draft, None)?, DraftState::default()));
                }
                let Some((caches, state)) = row.draft.as_mut() else { return Ok(false) };
                let _span = tracing::trace_span!("draft", tokens = k).entered();
                draft_greedy(draft, caches, state, &context, k, self.limits.prefill_step)?
            }
            DraftSource::Model(_) => return Ok(false),
        };
        let _step = tracing::trace_span!("speculative_step", drafts = guesses.size()).entered();
        for c in &mut batch.caches {
            if let LayerCache::Batch(b) = c {
                b.compact()?;
            }
        }
        let head = tokens(&[first])?;
        let x = ops::concatenate(&[&head, &ops::astype(&guesses, head.dtype())?], 0)?;
        let x = ops::reshape(&x, &[1, -1])?;
        let logits = ops::squeeze(&model.forward(&x, &mut batch.caches)?, &[0])?;
        let checked = check(row, &logits)?;
        eval(&[&checked.ids, &guesses])?;
        let sampled = read_ids("scheduler", &checked.ids)?;
        let drafts = read_ids("scheduler", &guesses)?;
        let k = drafts.len();
        let n = accepted(&drafts, &sampled);
        let now = Instant::now();
        let mut outcome = row.emit(&batch.pending, 0, first, now, self.mirrored);
        let mut handed = 1;
        for (i, &d) in drafts[..n].iter().enumerate() {
            if !matches!(outcome, Ok(true)) {
                break;
            }
            outcome = row.emit(&checked, i, d, now, self.mirrored);
            handed += 1;
        }
        row.drafted += k;
        row.accepted += handed - 1;
        self.spec_totals.steps += 1;
        self.spec_totals.drafted += k as u64;
        self.spec_totals.accepted += (handed - 1) as u64;
        // The caches hold the pending token and every guess: keep what was handed out
        // (and, when the row goes on, the accepted guesses behind its next pending token).
        let keep = if matches!(outcome, Ok(true)) { n + 1 } else { handed };
        trim(&mut batch.caches, (k + 1 - keep) as i32)?;
        match outcome {
            Ok(true) => {
                batch.pending = checked.take(&[n])?;
                Ok(true)
            }
            Ok(false) => self.settle(vec![(0, None)], &[], None, None).map(|()| true),
            Err(e) => self.settle(vec![(0, Some(core_err(e)))], &[], None, None).map(|()| true),
        }
    }
}

/// A row that may speculate: one that generates (not a classification),
/// draws without logits processors, and has at least two tokens to go.
fn row_may_speculate(row: &Row) -> bool {
    !row.classify && row.draw.history.is_none() && row.draw.constraint.is_none() && row.produced + 1 < row.max_tokens
}

/// Samples every position of `logits: [k + 1, V]` with the row's own
/// sampler and keys (greedy rows at once).
fn check(row: &mut Row, logits: &Array) -> Result<Outputs> {
    if row.draw.is_plain_greedy() {
        let logprobs = Sampler::logprobs(logits)?;
        let ids = ops::argmax(&logprobs, -1, false)?;
        return Ok(Outputs { ids, logprobs, logits: logits.clone() });
    }
    let mut parts = Vec::new();
    for i in 0..logits.dim(0)? {
        let one = ops::slice_axis(logits, 0, i, i + 1)?;
        let (ids, logprobs, logits) = row.draw.sample(&one, None)?;
        parts.push(Outputs { ids, logprobs, logits });
    }
    Outputs::concat(&parts)
}

/// Forgets the last `n` positions of every layer's cache.
fn trim(caches: &mut [LayerCache], n: i32) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    for c in caches {
        let done = c.trim(n);
        if done != n {
            return Err(Error::invalid("speculative", format!("a cache trimmed {done} of {n} positions")));
        }
    }
    Ok(())
}
