// SPDX-License-Identifier: EUPL-1.2
//! Requests coming in: admission (each starts from its session's caches, the
//! longest prefix the prompt cache holds, or nothing), prefill (see
//! `prefill.rs`), and rows whose prompts are in ending (one token) or
//! joining the batch.

use std::time::Instant;

use inference_core::Error as CoreError;
use mlx::{Error, Result, memory};

use super::prefill::{
    Prefill, Ready, choose_group, chunk_alone, fits_a_chunk, prefill_group, row_caches, single_row_caches,
};
use super::rows::{Draw, Outputs, Row, tokens};
use super::{Batch, Ending, Request, Scheduler, feed_last};
use crate::backend::core_err;
use crate::backend::mirror::Failure;
use crate::backend::supervise::failpoint;
use crate::backend::text::TextOut;
use crate::cache::LayerCache;
use crate::generate::read_ids;
use crate::model::LanguageModel;
use crate::tokenizer::Tokenizer;

impl Scheduler {
    /// Moves the first `n` waiting requests into prefill; returns those that could not start.
    pub(super) fn admit(
        &mut self,
        n: usize,
        model: &dyn LanguageModel,
        tokenizer: &Tokenizer,
        was_idle: bool,
    ) -> Vec<Failure> {
        let mut refused = Vec::new();
        if was_idle && n > 0 {
            // The peak reported with each generation is that of the busy spell it ran in.
            let _ = memory::reset_peak_memory();
        }
        for _ in 0..n {
            let Some((seq, request)) = self.waiting.pop_front() else { break };
            let footprint = request.footprint();
            let Request { ids, settings, max_tokens, sink, span, classify, group, mut session } = request;
            // A session's turn brings its caches; any other request starts
            // from the longest prefix the prompt cache holds, or from nothing.
            let quant = self.limits.kv_quant;
            let store = self.store.as_mut().filter(|_| session.is_none());
            let parts = || -> Result<(Draw, usize, Vec<LayerCache>)> {
                // Checks that every id fits the model's input type.
                let (draw, _) = (Draw::new(&settings, &ids, self.grammars.as_deref())?, tokens(&ids)?);
                let (cached, caches) = match (session.as_mut(), store) {
                    (Some(turn), _) => (0, std::mem::take(&mut turn.caches)),
                    (None, Some(store)) => match store.lookup(&ids)? {
                        Some((k, caches)) => (k, with_quant(caches, quant)),
                        None => (0, single_row_caches(model, quant)?),
                    },
                    (None, None) => (0, single_row_caches(model, quant)?),
                };
                Ok((draw, cached, caches))
            };
            let fail_point = self.mirrored && failpoint("mirror.admit");
            let parts = match parts() {
                Ok(_) if fail_point => {
                    Err(Error::invalid("scheduler", "fail point mirror.admit: the request could not start"))
                }
                parts => parts,
            };
            let (draw, reused, caches) = match parts {
                Ok(p) => p,
                Err(e) => {
                    refused.push(Failure { seq, error: e.to_string() });
                    // A session's turn gives its caches back untouched.
                    self.ending.push(Ending::Refused(sink, core_err(e), session));
                    continue;
                }
            };
            let row = Row {
                seq,
                footprint,
                sink,
                classify,
                group,
                cached: session.as_ref().map_or(reused, |t| t.cached),
                ids: if session.is_some() { Vec::new() } else { ids.clone() },
                stored: None,
                session,
                emitted: Vec::new(),
                span,
                out: TextOut::new(tokenizer, &settings),
                draw,
                max_tokens,
                context_bound: !classify && max_tokens < settings.max_tokens,
                stopped: false,
                produced: 0,
                prompt_tokens: ids.len() - reused,
                admitted: Instant::now(),
                first_token: None,
                draft: None,
                drafted: 0,
                accepted: 0,
                pace: Default::default(),
            };
            if max_tokens == 0 {
                let mut row = row;
                if let Some(t) = row.session.as_mut() {
                    t.caches = caches;
                }
                self.ending.push(Ending::Row(Box::new(row), None));
                continue;
            }
            let (full, held) = match &row.session {
                Some(t) => (t.ids.clone(), t.cached),
                None => (ids, reused),
            };
            self.prefilling.push_back(Prefill { row, full, held, caches });
        }
        refused
    }

    /// Prefills waiting prompts, about `prefill_step` tokens in all (see
    /// `prefill.rs`); returns the rows whose prompts are now in, with their
    /// first tokens sampled (lazily).
    pub(super) fn prefill(&mut self, model: &dyn LanguageModel) -> Vec<Ready> {
        let step = self.limits.prefill_step.max(1);
        let mut budget = step;
        let mut failed = Vec::new();
        for (i, p) in self.prefilling.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            if let Err(e) = chunk_alone(model, p, step, &mut budget) {
                failed.push((i, e));
            }
        }
        for (i, e) in failed.into_iter().rev() {
            if let Some(p) = self.prefilling.remove(i) {
                self.ending.push(Ending::Row(Box::new(p.into_row()), Some(core_err(e))));
            }
        }
        let mut ready = Vec::new();
        while budget > 0 {
            let all: Vec<&Prefill> = self.prefilling.iter().collect();
            let candidates: Vec<usize> = (0..all.len()).filter(|&i| fits_a_chunk(all[i], step)).collect();
            let (members, width) = choose_group(&all, &candidates, budget, self.limits.kv_quant.is_some());
            if members.is_empty() {
                break;
            }
            budget = budget.saturating_sub(members.len() * (width + 1));
            // Taken out from the back, so that the indices still to come stay put.
            let mut group: Vec<Prefill> = Vec::with_capacity(members.len());
            for &i in members.iter().rev() {
                group.extend(self.prefilling.remove(i));
            }
            group.reverse();
            match prefill_group(model, group, width, self.limits.kv_quant) {
                Ok(r) => ready.push(r),
                Err((e, rows)) => self.fail_rows(rows, e),
            }
        }
        ready
    }

    /// Rows whose prompts are in: those of one token (a classification,
    /// say) end here; the others join the batch.
    pub(super) fn end_or_join(
        &mut self,
        ready: Ready,
        model: &dyn LanguageModel,
    ) -> std::result::Result<(), (Error, Vec<Row>)> {
        let Ready { rows, mut caches, mut first } = ready;
        if rows.iter().all(|r| r.max_tokens > 1) {
            return self.join(rows, caches, first);
        }
        let ids = match read_ids("scheduler", &first.ids) {
            Ok(ids) => ids,
            Err(e) => return Err((e, rows)),
        };
        let (mut keep, mut joining) = (Vec::new(), Vec::new());
        let mirrored = self.mirrored;
        for (pos, mut row) in rows.into_iter().enumerate() {
            if row.max_tokens > 1 {
                keep.push(pos);
                joining.push(row);
                continue;
            }
            let ended = row_caches(&caches, pos).and_then(|c| {
                match row.session.as_mut() {
                    Some(t) => t.caches = c,
                    None => row.stored = Some(c),
                }
                row.emit(&first, pos, ids[pos], Instant::now(), mirrored)?;
                feed_last(model, &mut row)
            });
            self.ending.push(Ending::Row(Box::new(row), ended.err().map(core_err)));
        }
        if joining.is_empty() {
            return Ok(());
        }
        let mut kept = || -> Result<Outputs> {
            for c in &mut caches {
                if let LayerCache::Batch(b) = c {
                    b.filter(&keep)?;
                }
            }
            first.take(&keep)
        };
        match kept() {
            Ok(f) => first = f,
            Err(e) => return Err((e, joining)),
        }
        self.join(joining, caches, first)
    }

    /// Merges rows whose prompts are in (with their caches and first
    /// tokens) into the batch.
    fn join(
        &mut self,
        rows: Vec<Row>,
        caches: Vec<LayerCache>,
        first: Outputs,
    ) -> std::result::Result<(), (Error, Vec<Row>)> {
        let Some(batch) = &mut self.batch else {
            self.batch = Some(Batch { rows, caches, pending: first });
            return Ok(());
        };
        let merged = || -> Result<Outputs> {
            for (mine, theirs) in batch.caches.iter_mut().zip(&caches) {
                match (mine, theirs) {
                    (LayerCache::Batch(m), LayerCache::Batch(t)) => m.extend(t)?,
                    _ => return Err(Error::invalid("scheduler", "a batch holds batch caches only")),
                }
            }
            Outputs::concat(&[batch.pending.clone(), first])
        };
        match merged() {
            Ok(pending) => {
                batch.pending = pending;
                batch.rows.extend(rows);
                Ok(())
            }
            Err(e) => Err((e, rows)),
        }
    }

    /// Ends `rows` with `e`.
    pub(super) fn fail_rows(&mut self, rows: Vec<Row>, e: Error) {
        let message = e.to_string();
        let mut e = Some(e);
        if rows.len() == 1 {
            for r in rows {
                self.ending.push(Ending::Row(Box::new(r), e.take().map(core_err)));
            }
            return;
        }
        for r in rows {
            self.ending.push(Ending::Row(Box::new(r), Some(CoreError::backend(crate::backend::NAME, message.clone()))));
        }
    }
}

/// `caches` (from the prompt cache) quantised past their start as this engine's are.
fn with_quant(caches: Vec<LayerCache>, quant: Option<crate::cache::KvQuant>) -> Vec<LayerCache> {
    caches
        .into_iter()
        .map(|c| match c {
            LayerCache::Batch(b) => LayerCache::Batch(b.with_quant(quant)),
            other => other,
        })
        .collect()
}
