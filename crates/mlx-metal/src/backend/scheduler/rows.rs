// SPDX-License-Identifier: EUPL-1.2
//! A row of the batch: how it draws its tokens (its own sampler, random
//! keys and history), what it has produced, its outputs not read yet, and
//! how it ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use inference_core::{Error as CoreError, FinishReason, GenerateMetrics, GenerateSettings, Token, TokenSink};
use mlx::transforms::async_eval;
use mlx::{Array, Error, Result, memory, ops};

use super::super::text::TextOut;
use super::super::{core_err, lock};
use crate::constrain::{Grammars, RowConstraint};
use crate::generate::Step;
use crate::sample::{KeySequence, Sampler, SamplerConfig};

/// What a row draws with.
pub(super) struct Draw {
    pub(super) sampler: Sampler,
    pub(super) keys: KeySequence,
    /// Every token fed so far (int32 `[T]`), when a repetition penalty needs them.
    pub(super) history: Option<Array>,
    /// What the output must match (`crate::constrain`), when the settings say.
    pub(super) constraint: Option<RowConstraint>,
}

impl Draw {
    pub(super) fn new(settings: &GenerateSettings, prompt: &[u32], grammars: Option<&Grammars>) -> Result<Draw> {
        let sampler = sampler_for(settings)?;
        let seed = settings.seed.unwrap_or_else(fresh_seed);
        let history = if sampler.needs_history() { Some(tokens(prompt)?) } else { None };
        let constraint = match (&settings.constraint, grammars) {
            (None, _) => None,
            (Some(c), Some(g)) => Some(g.compile(c)?),
            (Some(c), None) => {
                return Err(Error::invalid("scheduler", format!("no compiler for the {} constraint", c.kind())));
            }
        };
        Ok(Draw { sampler, keys: KeySequence::new(seed)?, history, constraint })
    }

    /// Advances the constraint by the token drawn last (before the next draw).
    pub(super) fn commit(&mut self, id: u32) {
        if let Some(c) = &mut self.constraint {
            c.commit(id);
        }
    }

    /// Samples `logits: [1, V]` after feeding `fed` (`[1]` int32) to the history.
    pub(super) fn sample(&mut self, logits: &Array, fed: Option<&Array>) -> Result<(Array, Array, Array)> {
        let logits = match &mut self.history {
            Some(h) => {
                if let Some(fed) = fed {
                    *h = ops::concatenate(&[&*h, fed], 0)?;
                }
                self.sampler.process_history(logits, h)?
            }
            None => logits.clone(),
        };
        let logits = match &mut self.constraint {
            Some(c) => ops::add(&logits, &c.mask(logits.dim(-1)? as usize, logits.dtype())?)?,
            None => logits,
        };
        let logprobs = Sampler::logprobs(&logits)?;
        let y = self.sampler.sample_keyed(&logprobs, &mut self.keys)?;
        Ok((y, logprobs, logits))
    }

    /// Greedy with no logits processor: rows like this sample together.
    pub(super) fn is_plain_greedy(&self) -> bool {
        self.sampler.is_greedy() && self.history.is_none() && self.constraint.is_none()
    }
}

/// A seed for a request that gave none: different for every request.
pub(crate) fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default();
    now ^ NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
}

/// The sampler a generation's settings ask for.
pub(crate) fn sampler_for(settings: &GenerateSettings) -> Result<Sampler> {
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

pub(super) fn tokens(ids: &[u32]) -> Result<Array> {
    let ints = ids
        .iter()
        .map(|&t| i32::try_from(t).map_err(|_| Error::invalid("scheduler", format!("token id {t} is too large"))))
        .collect::<Result<Vec<i32>>>()?;
    Array::from_vec(&ints)
}

/// The rows of one call (a batch or a classification): the call's `job`
/// span, which records the tokens of every row when the last one has ended.
pub(crate) struct Group {
    span: tracing::Span,
    generated: AtomicUsize,
}

impl Group {
    /// A group whose span is `span` (with a `generated_tokens` field).
    pub(crate) fn new(span: tracing::Span) -> Arc<Group> {
        Arc::new(Group { span, generated: AtomicUsize::new(0) })
    }

    /// The call's span, the parent of its rows' spans.
    pub(crate) fn span(&self) -> &tracing::Span {
        &self.span
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.span.record("generated_tokens", self.generated.load(Ordering::Relaxed));
    }
}

/// One generation, from admission to its last token.
pub(super) struct Row {
    /// Its place in the order requests came in (its name in a [`super::Plan`]).
    pub(super) seq: u64,
    /// Every position it may hold (see `admission.rs`).
    pub(super) footprint: usize,
    pub(super) sink: TokenSink,
    /// Classification: the first token as drawn, whatever it is, then the end.
    pub(super) classify: bool,
    /// The call this row is one of, if it is one of several.
    pub(super) group: Option<Arc<Group>>,
    /// A chat session's turn (its caches are put back when the row ends).
    pub(super) session: Option<super::SessionTurn>,
    /// Prompt tokens the caches held already (a session's, or the prompt cache's).
    pub(super) cached: usize,
    /// The whole prompt (the prompt cache's key; empty for a session's turn).
    pub(super) ids: Vec<u32>,
    /// Its caches at the end, on their way to the prompt cache.
    pub(super) stored: Option<Vec<crate::cache::LayerCache>>,
    /// The ids handed out so far.
    pub(super) emitted: Vec<u32>,
    pub(super) span: tracing::Span,
    pub(super) out: TextOut,
    pub(super) draw: Draw,
    /// The most tokens it may generate: what it asked for, or fewer where the context ends first.
    pub(super) max_tokens: usize,
    /// Whether `max_tokens` is the context's end rather than what it asked for.
    pub(super) context_bound: bool,
    /// Whether the model ended it (an end-of-sequence token or a stop string).
    pub(super) stopped: bool,
    pub(super) produced: usize,
    pub(super) prompt_tokens: usize,
    pub(super) admitted: Instant,
    pub(super) first_token: Option<Instant>,
    /// Speculative decoding: the draft model's caches and what they hold, once it has drafted for this row.
    pub(super) draft: Option<(Vec<crate::cache::LayerCache>, crate::speculative::DraftState)>,
    /// Guesses checked for this row, and those accepted and handed out.
    pub(super) drafted: usize,
    pub(super) accepted: usize,
    /// Whether its steps speculate, while it decodes alone (`speculate.rs`).
    pub(super) pace: super::speculate::Pace,
}

impl Row {
    /// Hands the row its token: entry `pos` of `out`, whose id is `id`.
    /// Returns whether the row goes on. A `mirrored` row goes on when its
    /// consumer has gone (the plan of the next step ends it on every rank).
    pub(super) fn emit(&mut self, out: &Outputs, pos: usize, id: u32, now: Instant, mirrored: bool) -> Result<bool> {
        self.first_token.get_or_insert(now);
        let p = pos as i32;
        let logprobs = ops::squeeze(&ops::slice_axis(&out.logprobs, 0, p, p + 1)?, &[0])?;
        let logits = ops::squeeze(&ops::slice_axis(&out.logits, 0, p, p + 1)?, &[0])?;
        let step = Step { id, logprobs: &logprobs, logits: &logits };
        let sink = &self.sink;
        let mut send = |t: Token| sink.send(t).is_ok() || mirrored;
        let flow =
            if self.classify { self.out.push_raw(&step, &mut send)? } else { self.out.push(&step, &mut send)? };
        self.produced += 1;
        self.emitted.push(id);
        if let Some(why) = self.draw.constraint.as_ref().and_then(RowConstraint::error) {
            return Err(Error::invalid("constraint", format!("constrained decoding failed: {why}")));
        }
        self.stopped = flow.is_break();
        Ok(flow.is_continue() && self.produced < self.max_tokens)
    }

    /// Why it ended, once it has: `None` while it may still go on.
    fn finish_reason(&self) -> Option<FinishReason> {
        if self.stopped {
            Some(FinishReason::Stop)
        } else if self.produced >= self.max_tokens {
            Some(if self.context_bound { FinishReason::ContextLength } else { FinishReason::MaxTokens })
        } else {
            None
        }
    }

    /// Every token of its text so far: the conversation or prompt, then what it handed out.
    pub(super) fn context(&self) -> Vec<u32> {
        let prompt = self.session.as_ref().map_or(&self.ids, |t| &t.ids);
        prompt.iter().chain(&self.emitted).copied().collect()
    }

    pub(super) fn metrics(&self) -> GenerateMetrics {
        let end = Instant::now();
        let first = self.first_token.unwrap_or(end);
        // Active first, and the peak never below it: other threads allocate (or reset the
        // peak, as each admission does) between two reads of MLX's counters.
        let active = memory::active_memory().unwrap_or(0) as u64;
        let peak = (memory::peak_memory().unwrap_or(0) as u64).max(active);
        let mut m = GenerateMetrics {
            prompt_tokens: self.cached + self.prompt_tokens,
            cached_prompt_tokens: self.cached,
            generated_tokens: self.produced,
            prefill_duration: first - self.admitted,
            decode_duration: end - first,
            total_duration: end - self.admitted,
            peak_memory_bytes: peak,
            active_memory_bytes: active,
            stop_string: self.out.stop_string(),
            draft_tokens: self.drafted,
            accepted_draft_tokens: self.accepted,
            finish_reason: self.finish_reason(),
            ..GenerateMetrics::default()
        };
        m.compute_rates();
        m
    }
}

/// Sampled but not yet read: one entry per row of the batch (lazy).
#[derive(Clone)]
pub(super) struct Outputs {
    /// Token ids, `[B]`.
    pub(super) ids: Array,
    /// Log-probabilities, `[B, V]`.
    pub(super) logprobs: Array,
    /// The processed logits the ids were drawn from, `[B, V]`.
    pub(super) logits: Array,
}

impl Outputs {
    pub(super) fn concat(parts: &[Outputs]) -> Result<Outputs> {
        if let [one] = parts {
            return Ok(one.clone());
        }
        let cat = |f: fn(&Outputs) -> &Array| ops::concatenate(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        Ok(Outputs { ids: cat(|o| &o.ids)?, logprobs: cat(|o| &o.logprobs)?, logits: cat(|o| &o.logits)? })
    }

    pub(super) fn take(&self, keep: &[usize]) -> Result<Outputs> {
        let idx: Vec<i32> = keep.iter().map(|&k| k as i32).collect();
        let idx = Array::from_vec(&idx)?;
        Ok(Outputs {
            ids: ops::take(&self.ids, &idx, 0)?,
            logprobs: ops::take(&self.logprobs, &idx, 0)?,
            logits: ops::take(&self.logits, &idx, 0)?,
        })
    }

    pub(super) fn queue(&self) -> Result<()> {
        async_eval(&[&self.ids, &self.logprobs])
    }
}

/// Samples every row of `logits: [B, V]`; `fed` (`[B]` int32) is what went in.
pub(super) fn sample_rows(rows: &mut [Row], logits: &Array, fed: Option<&Array>) -> Result<Outputs> {
    if rows.iter().all(|r| r.draw.is_plain_greedy()) {
        let logprobs = Sampler::logprobs(logits)?;
        let ids = ops::argmax(&logprobs, -1, false)?;
        return Ok(Outputs { ids, logprobs, logits: logits.clone() });
    }
    let mut parts = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter_mut().enumerate() {
        let r = i as i32;
        let one = ops::slice_axis(logits, 0, r, r + 1)?;
        let fed = fed.map(|f| ops::slice_axis(f, 0, r, r + 1)).transpose()?;
        let (ids, logprobs, logits) = row.draw.sample(&one, fed.as_ref())?;
        parts.push(Outputs { ids, logprobs, logits });
    }
    Outputs::concat(&parts)
}

/// Ends a row: the held text goes out, then the metrics or the error. The
/// model's last metrics become this row's, unless it failed.
pub(super) fn finish(row: Row, error: Option<CoreError>, last_metrics: &Arc<Mutex<GenerateMetrics>>) {
    let m = row.metrics();
    row.span.record("generated_tokens", row.produced);
    if let Some(c) = &row.draw.constraint {
        let (spent, masks) = c.mask_cost();
        tracing::debug!(masks, mask_us_per_token = spent.as_micros() as u64 / u64::from(masks.max(1)), "constraint");
    }
    if let Some(g) = &row.group {
        g.generated.fetch_add(row.produced, Ordering::Relaxed);
    }
    let Row { sink, out, .. } = row;
    if let Some(e) = error {
        if e.is_cancelled() {
            *lock(last_metrics) = m;
        }
        return sink.fail(e);
    }
    match out.finish(&mut |t| sink.send(t).is_ok()) {
        Ok(()) => {
            *lock(last_metrics) = m;
            sink.finish(m);
        }
        Err(e) => sink.fail(core_err(e)),
    }
}
