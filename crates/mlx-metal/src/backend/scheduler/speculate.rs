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
//! plainly. A row that may speculate does so only while it pays: its
//! [`Pace`] times its steps with guesses and without, pauses guessing
//! while plain steps give tokens faster, and times both afresh now and then.

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
    /// The batch's decode steps, speculative or not: a row's [`Pace`] times
    /// only consecutive ones.
    pub(super) decodes: u64,
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

    /// One speculative step of the batch's one row. `Ok(false)` when its
    /// pace steps plainly now or there was nothing to guess: a plain step
    /// follows (nothing has changed but that the pending token may have been
    /// read).
    pub(super) fn speculate(&mut self, model: &dyn LanguageModel) -> Result<bool> {
        let (Some(spec), Some(batch)) = (self.speculator.as_ref(), self.batch.as_mut()) else { return Ok(false) };
        let [row] = &mut batch.rows[..] else { return Ok(false) };
        if !row.pace.speculates(Instant::now(), self.spec_totals.decodes, row.produced) {
            return Ok(false);
        }
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
                    row.pace.stepped_plainly();
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
            DraftSource::Model(_) => {
                row.pace.stepped_plainly();
                return Ok(false);
            }
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

/// Whether a row's steps speculate: the time a token takes with guesses
/// against plain steps, measured as the row decodes, so that guessing pauses
/// where it costs more than it saves (a draft that is seldom right; a check of
/// several tokens that costs much more than a step, as on a CPU with a
/// quantised model) and goes on where it pays. A row guesses for a run of
/// [`Pace::RUN`] steps, steps plainly as many to time them, then keeps
/// whichever took less time a token, deciding again after each run. While
/// plain steps are ahead it pauses guessing for runs of plain steps that
/// double (from [`Pace::MIN_PAUSE`] up to [`Pace::MAX_PAUSE`]) with a probe of
/// [`Pace::PROBE`] guessing steps after each, timed afresh, to notice a text
/// that has become easier to guess; while guesses are ahead it times
/// [`Pace::RUN`] plain steps afresh after stretches of guessing that double
/// the same way, so that plain steps timed in a slow moment (another process
/// busy on the machine) do not keep the row guessing for good. A step's time runs from its start to the next one's and
/// counts only where the step before was of the same kind and the batch's
/// previous step (a switch drains the other kind's queued work; another
/// request may have shared the batch). The output is the same either way:
/// only the speed depends on it.
#[derive(Debug, Default, Clone)]
pub(super) struct Pace {
    /// Seconds a token, moving averages: plain steps, speculative steps.
    per_token: [Option<f64>; 2],
    /// The run going on and its steps left.
    run: Option<(Run, u32)>,
    /// The length of the next pause.
    pause: u32,
    /// The length of the next stretch of guessing before plain steps are timed again.
    stretch: u32,
    /// Steps guessed since plain steps were last timed.
    since_timed: u32,
    /// The last step.
    last: Option<Step>,
}

/// A step of a row's [`Pace`].
#[derive(Debug, Clone, Copy)]
struct Step {
    /// When it started.
    at: Instant,
    /// The batch's step count then.
    step: u64,
    /// The row's tokens handed out then.
    produced: usize,
    /// Whether it speculated.
    guessed: bool,
    /// Whether the step before was of the same kind and the batch's step before: its time is timed.
    steady: bool,
}

/// A run of a row's steps ([`Pace`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Guessing.
    Guess,
    /// Plain steps, to time them.
    Measure,
    /// Plain steps while they are ahead.
    Pause,
}

impl Pace {
    /// Steps in a run of guesses, and in a run of plain steps that times them.
    pub(super) const RUN: u32 = 4;
    /// Guessing steps after a pause.
    pub(super) const PROBE: u32 = 2;
    /// The shortest and the longest pause, in plain steps.
    pub(super) const MIN_PAUSE: u32 = 16;
    pub(super) const MAX_PAUSE: u32 = 256;
    /// The weight of a new measurement in the moving averages.
    const WEIGHT: f64 = 0.3;

    /// Whether the step starting `now` (the batch's step `step`, the row
    /// having handed out `produced` tokens) should speculate.
    pub(super) fn speculates(&mut self, now: Instant, step: u64, produced: usize) -> bool {
        if let Some(last) = self.last
            && last.steady
            && last.step + 1 == step
            && produced > last.produced
        {
            let seconds = now.saturating_duration_since(last.at).as_secs_f64() / (produced - last.produced) as f64;
            let avg = &mut self.per_token[usize::from(last.guessed)];
            *avg = Some(avg.map_or(seconds, |a| a + Self::WEIGHT * (seconds - a)));
        }
        let guessed = self.next_run() == Run::Guess;
        let steady = self.last.is_some_and(|last| last.guessed == guessed && last.step + 1 == step);
        self.last = Some(Step { at: now, step, produced, guessed, steady });
        guessed
    }

    /// The step [`Pace::speculates`] let speculate had nothing to guess and
    /// went plainly: timed as a plain step.
    pub(super) fn stepped_plainly(&mut self) {
        if let Some(last) = self.last.as_mut() {
            (last.guessed, last.steady) = (false, false);
        }
    }

    /// The length `len` holds (from [`Pace::MIN_PAUSE`] up to
    /// [`Pace::MAX_PAUSE`]), doubling it for the next time: pauses and
    /// stretches of guessing grow alike.
    fn lengthen(len: &mut u32) -> u32 {
        let now = (*len).clamp(Self::MIN_PAUSE, Self::MAX_PAUSE);
        *len = (now * 2).min(Self::MAX_PAUSE);
        now
    }

    /// The run the next step belongs to: the current one, or a new one.
    fn next_run(&mut self) -> Run {
        if let Some((run, left)) = self.run.as_mut()
            && *left > 0
        {
            *left -= 1;
            return *run;
        }
        let (run, len) = match (self.run.map(|(run, _)| run), self.per_token) {
            (None, _) => (Run::Guess, Self::RUN),
            (Some(Run::Pause), _) => {
                // What the probe measures stands alone: the guesses timed before the pause
                // are of an earlier text.
                self.per_token[1] = None;
                (Run::Guess, Self::PROBE)
            }
            (Some(_), [None, _]) => (Run::Measure, Self::RUN),
            (Some(_), [Some(plain), Some(spec)]) if spec >= plain => {
                (self.stretch, self.since_timed) = (Self::MIN_PAUSE, 0);
                (Run::Pause, Self::lengthen(&mut self.pause))
            }
            (Some(_), _) => {
                self.pause = Self::MIN_PAUSE;
                if self.since_timed >= self.stretch.max(Self::MIN_PAUSE) {
                    // What the re-timing measures stands alone, as a probe's guesses do.
                    self.per_token[0] = None;
                    Self::lengthen(&mut self.stretch);
                    self.since_timed = 0;
                    (Run::Measure, Self::RUN)
                } else {
                    self.since_timed += Self::RUN;
                    (Run::Guess, Self::RUN)
                }
            }
        };
        self.run = Some((run, len - 1));
        run
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The kinds of `n` steps of a row whose plain step takes `plain_ms` a token and whose
    /// speculative step takes `spec_ms` and hands out `spec_tokens`, from one [`Pace`]; `gap_at`
    /// leaves a step of the batch out there (another request shared it) and lets a minute pass.
    fn run(n: usize, plain_ms: u64, spec_ms: u64, spec_tokens: usize, gap_at: Option<usize>) -> Vec<bool> {
        drive(n, gap_at, |_, spec| if spec { (spec_ms, spec_tokens) } else { (plain_ms, 1) })
    }

    /// The kinds of `n` steps from one [`Pace`], step `i` (speculative or not) taking the
    /// milliseconds and handing out the tokens `times(i, spec)` says; `gap_at` as in [`run`].
    fn drive(n: usize, gap_at: Option<usize>, times: impl Fn(usize, bool) -> (u64, usize)) -> Vec<bool> {
        let mut pace = Pace::default();
        let (mut now, mut step, mut produced) = (Instant::now(), 0u64, 0usize);
        let mut kinds = Vec::with_capacity(n);
        for i in 0..n {
            if gap_at == Some(i) {
                now += Duration::from_secs(60);
                step += 1;
            }
            let spec = pace.speculates(now, step, produced);
            kinds.push(spec);
            let (ms, tokens) = times(i, spec);
            now += Duration::from_millis(ms);
            produced += tokens;
            step += 1;
        }
        kinds
    }

    fn runs(kinds: &[bool]) -> Vec<(bool, usize)> {
        let mut out: Vec<(bool, usize)> = Vec::new();
        for &k in kinds {
            match out.last_mut() {
                Some((kind, len)) if *kind == k => *len += 1,
                _ => out.push((k, 1)),
            }
        }
        out
    }

    #[test]
    fn a_row_keeps_guessing_where_it_pays() {
        // 3 tokens in 4 ms against 2 ms a plain token: guesses, plain steps timed, then stretches
        // of guessing of 16, 32, 64, ... steps, plain steps timed again after each.
        let kinds = run(1000, 2, 4, 3, None);
        let r = Pace::RUN as usize;
        let got = runs(&kinds);
        assert_eq!(got[..2], [(true, r), (false, r)], "{got:?}");
        let mut stretch = Pace::MIN_PAUSE as usize;
        for pair in got[2..got.len() - 1].chunks(2) {
            assert_eq!(pair[0], (true, stretch), "{got:?}");
            if pair.len() == 2 {
                assert_eq!(pair[1], (false, r), "{got:?}");
            }
            stretch = (stretch * 2).min(Pace::MAX_PAUSE as usize);
        }
        let plain = kinds.iter().filter(|&&k| !k).count();
        assert!(plain * 20 < kinds.len(), "{plain} of {} steps plain", kinds.len());
    }

    #[test]
    fn plain_steps_timed_in_a_slow_moment_are_timed_again() {
        // Plain steps take 100 ms while they are first timed (another process busy), then 2 ms;
        // 2 tokens in 6 ms: the row guesses at first, then times plain steps again and pauses.
        let kinds = drive(200, None, |step, spec| match (spec, step < 2 * Pace::RUN as usize) {
            (true, _) => (6, 2),
            (false, true) => (100, 1),
            (false, false) => (2, 1),
        });
        let got = runs(&kinds);
        let r = Pace::RUN as usize;
        // Guesses, plain steps timed slow, a stretch of guesses, plain steps timed again: a pause.
        assert_eq!(
            got[..4],
            [(true, r), (false, r), (true, Pace::MIN_PAUSE as usize), (false, r + Pace::MIN_PAUSE as usize)],
            "{got:?}"
        );
        let guessed = kinds[100..].iter().filter(|&&k| k).count();
        assert!(guessed * 10 < 100, "{guessed} of the last 100 steps guessed: {got:?}");
    }

    #[test]
    fn a_row_pauses_guessing_where_it_costs_and_probes_again() {
        // 2 tokens in 6 ms against 2 ms a plain token.
        let kinds = run(2000, 2, 6, 2, None);
        let (r, probe) = (Pace::RUN as usize, Pace::PROBE as usize);
        let got = runs(&kinds);
        // Guesses and plain steps timed, then pauses of 16, 32, ... 256 plain steps (the time
        // timing them counted in the first), each followed by a probe of guesses.
        assert_eq!(got[..2], [(true, r), (false, r + Pace::MIN_PAUSE as usize)], "{got:?}");
        let mut pause = 2 * Pace::MIN_PAUSE as usize;
        for pair in got[2..got.len() - 1].chunks(2) {
            assert_eq!(pair[0], (true, probe), "{got:?}");
            if pair.len() == 2 {
                assert_eq!(pair[1], (false, pause), "{got:?}");
            }
            pause = (pause * 2).min(Pace::MAX_PAUSE as usize);
        }
        assert_eq!(pause, Pace::MAX_PAUSE as usize, "the pauses reached their longest: {got:?}");
        let guessed = kinds.iter().filter(|&&k| k).count();
        assert!(guessed * 50 < kinds.len(), "{guessed} of {} steps guessed", kinds.len());
    }

    #[test]
    fn a_row_that_becomes_easier_to_guess_guesses_again() {
        // Slow guesses for 300 steps, then fast ones: the next probe finds them.
        let kinds = drive(1200, None, |step, spec| match (spec, step >= 300) {
            (false, _) => (2, 1),
            (true, false) => (6, 1),
            (true, true) => (4, 4),
        });
        // The pause going on at step 300 ends within the longest pause; from the probe after it,
        // guessing but for plain steps timed again now and then.
        let resumed = (300..kinds.len()).find(|&i| kinds[i]).expect("a probe after step 300");
        assert!(resumed <= 300 + Pace::MAX_PAUSE as usize, "paused until step {resumed}");
        let got = runs(&kinds[resumed..]);
        assert!(got.iter().all(|&(k, len)| k || len == Pace::RUN as usize), "{got:?}");
        let plain = kinds[resumed..].iter().filter(|&&k| !k).count();
        assert!(plain * 10 < kinds.len() - resumed, "{plain} of {} steps plain: {got:?}", kinds.len() - resumed);
    }

    #[test]
    fn steps_of_another_kind_or_not_in_a_row_are_not_timed() {
        // The minute between steps 10 and 11 (the batch's step 11 left out) is not a token's time:
        // with it counted as a guess's time, guessing would pause.
        assert_eq!(run(40, 2, 4, 3, Some(10)), run(40, 2, 4, 3, None));
        let mut pace = Pace::default();
        let now = Instant::now();
        assert!(pace.speculates(now, 0, 0));
        pace.stepped_plainly();
        assert!(pace.speculates(now + Duration::from_millis(1), 1, 1));
        // Step 0 went plainly (nothing to guess), so step 1 was not steady: nothing timed.
        assert_eq!(pace.per_token, [None, None]);
    }
}
