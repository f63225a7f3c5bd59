// SPDX-License-Identifier: EUPL-1.2
//! Continuous batching: the scheduler the engine thread runs between jobs.
//!
//! Every generation is a *row*. A request waits until there is room
//! ([`Limits::max_batch`] rows), then its prompt is prefilled on a cache of
//! its own, at most [`Limits::prefill_step`] prompt tokens per step (all
//! requests together), so a long prompt never holds up the others' streams
//! for more than one chunk. When its prompt is in, the row joins the running
//! batch: its cache is merged into the batch's left-padded caches and from
//! then on every step runs one forward pass for all rows, samples each row
//! with its own settings and its own random keys, hands each token to its
//! own stream and retires the rows that finished, were cancelled or whose
//! consumer went away. Nobody waits for the batch to drain.
//!
//! The cache layout is today's left-padded [`BatchKvCache`](crate::cache::BatchKvCache) (mlx-lm's
//! `BatchKVCache`): rows are aligned on their last position, a joining row
//! is padded on the left (or the batch is, when the newcomer is longer), a
//! retiring row is taken out with `take`. Merging copies the batch's cache
//! once per join and filtering once per retirement, but a decode step reads
//! one contiguous buffer per layer. Per-row caches gathered every step
//! would copy everything at every step, and paged caches need an attention
//! kernel over pages that MLX does not have. Sliding-window layers drop the
//! columns that left every row's window ([`BatchKvCache::compact`](crate::cache::BatchKvCache::compact)).
//!
//! Each step queues the next forward pass before reading the tokens of the
//! current one (as the single-stream loop does), so the device works on
//! step n+1 while the host hands out step n's tokens; a row that finishes at
//! step n costs one wasted row of step n+1.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use inference_core::{EngineLoad, Error as CoreError, GenerateMetrics, TokenSink};
use mlx::{Array, Dtype, Error, Result, memory, ops};

use self::admission::KvBudget;
use self::prefill::{Prefill, row_caches};
use self::rows::{Outputs, Row, finish, sample_rows, tokens};
use self::store::PromptStore;
use super::{core_err, lock};
use crate::cache::LayerCache;
use crate::constrain::Grammars;
use crate::generate::read_ids;
use crate::model::LanguageModel;
use crate::tokenizer::Tokenizer;

mod admission;
mod failures;
mod intake;
mod prefill;
mod radix;
mod request;
mod rows;
mod speculate;
mod store;

pub use self::request::{DEFAULT_MAX_BATCH, Limits};
pub(crate) use self::request::{Plan, Request, Returned, SessionTurn};

pub(crate) use self::rows::{Group, fresh_seed};
pub(crate) use self::speculate::Speculator;

/// The rows decoding together.
struct Batch {
    rows: Vec<Row>,
    caches: Vec<LayerCache>,
    /// The outputs of the last forward pass, one per row, not read yet.
    pending: Outputs,
}

/// The scheduler's queues and batch.
pub(crate) struct Scheduler {
    limits: Limits,
    /// Requests waiting for room, with the order they came in.
    waiting: VecDeque<(u64, Request)>,
    prefilling: VecDeque<Prefill>,
    /// The next request's place in the order.
    next_seq: u64,
    /// Requests from this place on wait until [`Scheduler::release`] (a job
    /// that must see the model alone runs first).
    hold_from: Option<u64>,
    batch: Option<Batch>,
    /// What [`MetalModel::engine_load`](super::MetalModel) reports, updated every step.
    load: Arc<Mutex<EngineLoad>>,
    /// Generations that ended during a step, told after the load is published (so that a
    /// caller whose stream has ended sees a load without it).
    ending: Vec<Ending>,
    /// Sessions' caches back from their turns, for the engine to take.
    returned: Vec<Returned>,
    /// A tensor-parallel rank: a consumer that went away is seen through the
    /// plan at the next step, never in the middle of one.
    mirrored: bool,
    /// The KV-cache budget, once [`Scheduler::size_up`] has run.
    kv: Option<KvBudget>,
    /// The prompt cache (`store.rs`), once [`Scheduler::size_up`] has run, unless turned off.
    store: Option<PromptStore>,
    /// The model's constraint compiler (`crate::constrain`), for rows whose settings have one.
    grammars: Option<Arc<Grammars>>,
    /// Speculative decoding (`speculate.rs`), when the load settings ask for it.
    speculator: Option<Speculator>,
    spec_totals: speculate::SpecTotals,
    /// A mirrored scheduler's rows that failed here, for the other ranks (`failures.rs`).
    failed: Vec<crate::backend::mirror::Failure>,
}

/// A generation that ended.
enum Ending {
    /// Refused before it started (a session's turn gives its caches back untouched).
    Refused(TokenSink, CoreError, Option<SessionTurn>),
    /// A row: finished, or ended by an error.
    Row(Box<Row>, Option<CoreError>),
}

impl Scheduler {
    /// A scheduler within `limits` that publishes its `load`; `mirrored` on a
    /// tensor-parallel rank (see [`Plan`]).
    pub(crate) fn new(
        limits: Limits,
        load: Arc<Mutex<EngineLoad>>,
        mirrored: bool,
        grammars: Option<Arc<Grammars>>,
    ) -> Scheduler {
        lock(&load).max_batch = limits.max_batch.max(1);
        Scheduler {
            limits,
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            next_seq: 0,
            hold_from: None,
            batch: None,
            load,
            ending: Vec::new(),
            returned: Vec::new(),
            mirrored,
            kv: None,
            store: None,
            grammars,
            speculator: None,
            spec_totals: speculate::SpecTotals::default(),
            failed: Vec::new(),
        }
    }

    /// The constraint compiler its rows use.
    pub(crate) fn grammars(&self) -> Option<Arc<Grammars>> {
        self.grammars.clone()
    }

    /// Publishes the queue and batch sizes; `stepped` counts a decode step of `rows` rows.
    fn publish(&self, stepped: Option<usize>) {
        let mut load = lock(&self.load);
        load.queued = self.waiting.len();
        load.running = self.running();
        load.batch_size = self.batch.as_ref().map_or(0, |b| b.rows.len());
        if let Some(rows) = stepped {
            load.decode_steps += 1;
            load.peak_batch_size = load.peak_batch_size.max(rows);
        }
        if let Some(s) = self.store.as_ref().map(PromptStore::stats) {
            (load.prompt_cache_entries, load.prompt_cache_bytes, load.prompt_cache_capacity_bytes) =
                (s.entries, s.bytes, s.capacity);
            (load.prompt_cache_hits, load.prompt_cache_reused_tokens) = (s.hits, s.reused_tokens);
        }
        let t = self.spec_totals;
        (load.speculative_steps, load.draft_tokens, load.accepted_draft_tokens) = (t.steps, t.drafted, t.accepted);
    }

    /// Keeps the caches of the rows that ended well in the prompt cache,
    /// publishes the load, then tells the generations that ended.
    fn publish_and_end(&mut self, stepped: Option<usize>, last_metrics: &Arc<Mutex<GenerateMetrics>>) {
        for ending in &mut self.ending {
            if let (Ending::Row(row, error), Some(store)) = (ending, self.store.as_mut())
                && error.as_ref().is_none_or(CoreError::is_cancelled)
                && let Some(caches) = row.stored.take()
                && let Err(e) = store::keep(store, &row.ids, &row.emitted, caches)
            {
                tracing::warn!(error = %e, "a generation's caches could not go into the prompt cache");
            }
        }
        self.publish(stepped);
        for ending in std::mem::take(&mut self.ending) {
            match ending {
                Ending::Refused(sink, e, turn) => {
                    if let Some(t) = turn {
                        self.returned.push(Returned {
                            id: t.id,
                            ids: t.ids,
                            emitted: Vec::new(),
                            caches: Some(t.caches),
                        });
                    }
                    sink.fail(e);
                }
                Ending::Row(mut row, error) => {
                    if let Some(t) = row.session.take() {
                        let failed = error.as_ref().is_some_and(|e| !e.is_cancelled());
                        let caches = if failed { None } else { Some(t.caches) };
                        self.returned.push(Returned { id: t.id, ids: t.ids, emitted: row.emitted.clone(), caches });
                    }
                    finish(*row, error, last_metrics);
                }
            }
        }
    }

    /// The sessions' caches that came back since the last call.
    pub(crate) fn take_returned(&mut self) -> Vec<Returned> {
        std::mem::take(&mut self.returned)
    }

    /// Nothing waiting, nothing running.
    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.prefilling.is_empty() && self.batch.is_none()
    }

    /// Rows being prefilled or decoded.
    pub(crate) fn running(&self) -> usize {
        self.prefilling.len() + self.batch.as_ref().map_or(0, |b| b.rows.len())
    }

    /// Queues a generation; it starts at a coming step.
    pub(crate) fn submit(&mut self, request: Request) {
        self.waiting.push_back((self.next_seq, request));
        self.next_seq += 1;
        self.publish(None);
    }

    /// Works out what a position of the KV cache costs for `model` (and the
    /// draft model of [`Scheduler::speculate_with`], which must come first)
    /// and the budget (see `admission.rs`).
    pub(crate) fn size_up(&mut self, model: &dyn LanguageModel) -> Result<()> {
        let store = admission::prompt_cache_bytes(self.limits.prompt_cache_bytes)?;
        self.store = (store > 0).then(|| PromptStore::new(store));
        let draft = self.speculator.as_ref().and_then(|s| s.draft.as_deref());
        let kv = KvBudget::for_model(model, draft, self.limits.kv_cache_bytes, store, self.limits.kv_quant)?;
        let mut load = lock(&self.load);
        (load.kv_bytes_per_token, load.kv_budget_bytes) = (kv.per_token, kv.budget);
        drop(load);
        self.kv = Some(kv);
        self.publish(None);
        Ok(())
    }

    /// The quantised KV cache's settings, if any (a session's caches take them).
    pub(crate) fn kv_quant(&self) -> Option<crate::cache::KvQuant> {
        self.limits.kv_quant
    }

    /// Refuses a generation whose KV cache could never fit the budget, even alone.
    pub(crate) fn check_fits(&self, positions: usize) -> Result<(), CoreError> {
        self.kv.map_or(Ok(()), |kv| kv.check(positions))
    }

    /// Admits no request submitted from now on until [`Scheduler::release`].
    pub(crate) fn hold(&mut self) {
        self.hold_from.get_or_insert(self.next_seq);
    }

    /// Admits again.
    pub(crate) fn release(&mut self) {
        self.hold_from = None;
    }

    /// Empties the prompt cache (its caches belong to a model that changed);
    /// what it keeps from now on was made with `origin` (the adapter).
    pub(crate) fn clear_prompt_cache(&mut self, origin: &str) {
        if let Some(store) = &mut self.store {
            store.clear(origin);
        }
        self.publish(None);
    }

    /// Keeps the prompt cache in `dir` too, and takes back what is there
    /// for this model and `origin` (see `store.rs`); nothing without a prompt cache.
    pub(crate) fn open_prompt_cache_dir(
        &mut self,
        dir: &std::path::Path,
        model: &dyn LanguageModel,
        fingerprint: &crate::session::Fingerprint,
        origin: &str,
    ) -> Result<()> {
        if let Some(store) = &mut self.store {
            store.open_dir(dir, model, fingerprint, origin)?;
        }
        self.publish(None);
        Ok(())
    }

    /// Writes the prompt cache's new entries to its directory, if it has one.
    pub(crate) fn persist_prompt_cache(&mut self) {
        if let Some(Err(e)) = self.store.as_mut().map(PromptStore::persist) {
            tracing::warn!(error = %e, "the prompt cache could not be written to its directory");
        }
    }

    /// Nothing runs, and nothing waits but requests held back.
    pub(crate) fn drained(&self) -> bool {
        let held = |seq: u64| self.hold_from.is_some_and(|h| seq >= h);
        self.prefilling.is_empty() && self.batch.is_none() && self.waiting.front().is_none_or(|(seq, _)| held(*seq))
    }

    /// This process's plan for the next step: the generations whose streams
    /// were cancelled or dropped, and what fits of the rest of the queue.
    pub(crate) fn plan(&self) -> Plan {
        let cancelled = |sink: &TokenSink| sink.is_cancelled();
        let mut cancel: Vec<u64> =
            self.prefilling.iter().filter(|p| cancelled(&p.row.sink)).map(|p| p.row.seq).collect();
        let batch = self.batch.as_ref().map_or(&[][..], |b| &b.rows[..]);
        cancel.extend(batch.iter().filter(|r| cancelled(&r.sink)).map(|r| r.seq));
        let staying = self.running() - cancel.len();
        let mut width = self.prefilling.iter().map(|p| p.row.footprint).chain(batch.iter().map(|r| r.footprint)).max();
        cancel.extend(self.waiting.iter().filter(|(_, r)| cancelled(&r.sink)).map(|(s, _)| *s));
        let mut room = self.limits.max_batch.max(1).saturating_sub(staying);
        let mut admit = 0;
        for (seq, r) in &self.waiting {
            if room == 0 || self.hold_from.is_some_and(|h| *seq >= h) {
                break;
            }
            if cancelled(&r.sink) {
                continue;
            }
            // Oldest first: a request that does not fit yet holds back the ones behind it.
            let wider = width.unwrap_or(0).max(r.footprint());
            if self.kv.is_some_and(|kv| !kv.fits(staying + admit + 1, wider)) {
                break;
            }
            width = Some(wider);
            admit += 1;
            room -= 1;
        }
        Plan { admit, cancel }
    }

    /// One step of `plan`: ends the cancelled generations, admits what the
    /// plan says, prefills up to the budget, then decodes one token for
    /// every row of the batch.
    pub(crate) fn step(
        &mut self,
        plan: &Plan,
        model: &dyn LanguageModel,
        tokenizer: &Tokenizer,
        last_metrics: &Arc<Mutex<GenerateMetrics>>,
    ) {
        self.begin_step(plan, model, tokenizer);
        self.finish_step(model, last_metrics);
    }

    /// The first part of a step: ends the cancelled generations and admits
    /// what the plan says; returns the admitted requests that could not start
    /// (a tensor-parallel rank tells the others before anything runs).
    pub(crate) fn begin_step(
        &mut self,
        plan: &Plan,
        model: &dyn LanguageModel,
        tokenizer: &Tokenizer,
    ) -> Vec<crate::backend::mirror::Failure> {
        self.cancel(&plan.cancel);
        let was_idle = self.prefilling.is_empty() && self.batch.is_none();
        self.admit(plan.admit, model, tokenizer, was_idle)
    }

    /// The rest of a step: prefills up to the budget, then decodes one token
    /// for every row of the batch.
    pub(crate) fn finish_step(&mut self, model: &dyn LanguageModel, last_metrics: &Arc<Mutex<GenerateMetrics>>) {
        for ready in self.prefill(model) {
            if let Err((e, rows)) = self.end_or_join(ready, model) {
                tracing::warn!(error = %e, rows = rows.len(), "rows whose prompts went in could not join the batch");
                self.fail_rows(rows, e);
            }
        }
        let rows = self.batch.as_ref().map(|b| b.rows.len());
        if let Err(e) = self.decode(model) {
            self.fail_batch(&e);
        }
        self.publish_and_end(rows, last_metrics);
    }

    /// One decode step of the batch: queues the next forward pass, hands
    /// out the pending tokens, retires the rows that are done.
    fn decode(&mut self, model: &dyn LanguageModel) -> Result<()> {
        self.spec_totals.decodes += 1;
        if self.may_speculate() && self.speculate(model)? {
            return Ok(());
        }
        let Some(batch) = self.batch.as_mut() else { return Ok(()) };
        let _step = tracing::trace_span!("decode_step", rows = batch.rows.len()).entered();
        // Queue the next step unless every row ends with this token.
        let more = batch.rows.iter().any(|r| r.produced + 1 < r.max_tokens);
        // A constrained row's next mask depends on the token it hands out
        // now: those are read (and committed) before the next draw. A row's
        // first token is read and handed out before the next pass is queued
        // too: queuing a pass waits while too many of MLX's tasks are in
        // flight (on the CPU, for most of the pass before), which would hold
        // the first token back by most of a step.
        let fresh = batch.rows.iter().any(|r| r.first_token.is_none());
        let early = if (fresh || batch.rows.iter().any(|r| r.draw.constraint.is_some())) && more {
            let ids = read_ids("scheduler", &batch.pending.ids)?;
            for (row, &id) in batch.rows.iter_mut().zip(&ids) {
                row.draw.commit(id);
            }
            Some(ids)
        } else {
            None
        };
        let mut handed: Vec<Option<Result<bool>>> = (0..batch.rows.len()).map(|_| None).collect();
        if let (true, Some(ids)) = (fresh, &early) {
            let now = Instant::now();
            for (pos, row) in batch.rows.iter_mut().enumerate().filter(|(_, r)| r.first_token.is_none()) {
                handed[pos] = Some(row.emit(&batch.pending, pos, ids[pos], now, self.mirrored));
            }
        }
        let next = if more {
            for c in &mut batch.caches {
                if let LayerCache::Batch(b) = c {
                    b.compact()?;
                }
            }
            let x = ops::reshape(&batch.pending.ids, &[-1, 1])?;
            let logits = ops::squeeze(&model.forward(&x, &mut batch.caches)?, &[1])?;
            let fed = ops::astype(&batch.pending.ids, Dtype::Int32)?;
            let next = sample_rows(&mut batch.rows, &logits, Some(&fed))?;
            next.queue()?;
            Some(next)
        } else {
            None
        };
        let ids = match early {
            Some(ids) => ids,
            None => read_ids("scheduler", &batch.pending.ids)?,
        };
        let now = Instant::now();
        let mut keep = Vec::with_capacity(batch.rows.len());
        let mut done: Vec<(usize, Option<CoreError>)> = Vec::new();
        let mut failed = Vec::new();
        for (pos, row) in batch.rows.iter_mut().enumerate() {
            let outcome = match handed[pos].take() {
                Some(outcome) => outcome,
                None => row.emit(&batch.pending, pos, ids[pos], now, self.mirrored),
            };
            let outcome = match outcome {
                Ok(_) if self.mirrored && crate::backend::supervise::failpoint("mirror.emit") => {
                    Err(Error::invalid("scheduler", "fail point mirror.emit: the row's token could not be handed out"))
                }
                outcome => outcome,
            };
            match outcome {
                Ok(true) if next.is_some() => keep.push(pos),
                Ok(_) => done.push((pos, None)),
                // Kept until every rank has heard of it (`failures.rs`).
                Err(e) if self.mirrored && next.is_some() => {
                    failed.push((row.seq, e.to_string()));
                    keep.push(pos);
                }
                Err(e) => done.push((pos, Some(core_err(e)))),
            }
        }
        for (seq, error) in failed {
            self.failed_here(seq, error);
        }
        self.settle(done, &keep, next, Some(model))
    }

    /// Between steps: ends the generations in `cancel` (see [`Plan`]), so
    /// that a job that follows a cancel sees it done.
    pub(crate) fn retire(&mut self, cancel: &[u64], last_metrics: &Arc<Mutex<GenerateMetrics>>) {
        self.cancel(cancel);
        self.publish_and_end(None, last_metrics);
    }

    /// Ends the generations in `cancel` (by the order they came in), wherever they are.
    fn cancel(&mut self, cancel: &[u64]) {
        if !cancel.is_empty() {
            self.end(&|seq| cancel.contains(&seq).then_some(CoreError::Cancelled));
        }
    }

    /// Ends the rows at `done`; the rows at `keep` go on with `next` (one
    /// entry per row before the change), or the batch ends without it.
    ///
    /// A session's row takes its caches along; when this step ran no forward
    /// pass (`model` is then given), its last token is fed to them, so that a
    /// session's caches always hold every token of its turn, batched or not.
    fn settle(
        &mut self,
        done: Vec<(usize, Option<CoreError>)>,
        keep: &[usize],
        next: Option<Outputs>,
        model: Option<&dyn LanguageModel>,
    ) -> Result<()> {
        let Some(batch) = self.batch.as_mut() else { return Ok(()) };
        if done.is_empty()
            && let Some(next) = next
        {
            batch.pending = next;
            return Ok(());
        }
        let mut rows: Vec<Option<Row>> = std::mem::take(&mut batch.rows).into_iter().map(Some).collect();
        for (pos, error) in done {
            if let Some(mut row) = rows.get_mut(pos).and_then(Option::take) {
                if let Some(t) = row.session.as_mut() {
                    t.caches = row_caches(&batch.caches, pos)?;
                } else if self.store.is_some() && error.as_ref().is_none_or(CoreError::is_cancelled) {
                    row.stored = Some(row_caches(&batch.caches, pos)?);
                }
                if let (None, Some(model)) = (&next, model) {
                    feed_last(model, &mut row)?;
                }
                self.ending.push(Ending::Row(Box::new(row), error));
            }
        }
        let kept: Vec<Row> = rows.into_iter().flatten().collect();
        match next {
            Some(next) if !kept.is_empty() => {
                for c in &mut batch.caches {
                    if let LayerCache::Batch(b) = c {
                        b.filter(keep)?;
                    }
                }
                batch.pending = next.take(keep)?;
                batch.rows = kept;
            }
            _ => {
                self.ending.extend(kept.into_iter().map(|row| Ending::Row(Box::new(row), None)));
                self.batch = None;
            }
        }
        if self.is_idle() {
            memory::clear_cache()?;
        }
        Ok(())
    }

    /// Fails every row of the batch with `e` (a forward pass failed).
    /// Ends every generation it holds, waiting or running, with `message` (what a caught
    /// panic leaves: the state of the step it cut short is unknown, so none of it is kept, and
    /// sessions' turns that had started lose their caches).
    pub(crate) fn fail_all(&mut self, message: &str, last_metrics: &Arc<Mutex<GenerateMetrics>>) {
        if self.mirrored {
            self.record_all_failed(message);
        }
        let error = || CoreError::backend(super::NAME, message.to_owned());
        for (_, request) in std::mem::take(&mut self.waiting) {
            self.ending.push(Ending::Refused(request.sink, error(), request.session));
        }
        for prefill in std::mem::take(&mut self.prefilling) {
            self.ending.push(Ending::Row(Box::new(prefill.row), Some(error())));
        }
        for row in self.batch.take().map(|b| b.rows).unwrap_or_default() {
            self.ending.push(Ending::Row(Box::new(row), Some(error())));
        }
        self.publish_and_end(None, last_metrics);
    }

    /// Counts a panic the engine caught (see `supervise.rs`).
    pub(crate) fn caught_panic(&mut self) {
        lock(&self.load).caught_panics += 1;
    }

    fn fail_batch(&mut self, e: &Error) {
        if let Some(batch) = self.batch.take() {
            tracing::warn!(error = %e, rows = batch.rows.len(), "a batched step failed");
            for row in batch.rows {
                self.ending.push(Ending::Row(Box::new(row), Some(CoreError::backend(super::NAME, e.to_string()))));
            }
        }
    }
}

/// A session row that ends: queues its last token through the model into
/// the row's caches (lazily; the next turn evaluates it), as a run alone
/// feeds every token it hands out.
fn feed_last(model: &dyn LanguageModel, row: &mut Row) -> Result<()> {
    let (Some(turn), Some(&last)) = (row.session.as_mut(), row.emitted.last()) else { return Ok(()) };
    let x = tokens(&[last])?;
    model.forward(&ops::reshape(&x, &[1, 1])?, &mut turn.caches)?;
    let state: Vec<&Array> = turn.caches.iter().flat_map(LayerCache::state).collect();
    mlx::transforms::async_eval(&state)
}
