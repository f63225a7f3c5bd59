// SPDX-License-Identifier: EUPL-1.2
//! Ending generations by order number, wherever they are (waiting, being
//! prefilled, in the batch): for cancels in a step's plan, and for the
//! failures of one rank in a tensor-parallel job.
//!
//! A mirrored scheduler (one rank of a tensor-parallel job) never ends a row
//! on its own for an error of its own when the row would go on: the other
//! ranks, which did not fail, would run it in the next forward pass and the
//! ranks would fall out of step. It keeps the row, records the failure
//! ([`Scheduler::take_failed`]), and the engine's next exchange with the other
//! ranks ends it on every rank with [`Scheduler::end_with`]
//! (`backend/mirror.rs`). No forward pass runs in between, so no rank ever
//! runs a step with a row another rank has ended. A panic the engine caught
//! ends every generation on its rank at once; they are recorded too, so the
//! other ranks end them at the next exchange.

use std::sync::{Arc, Mutex};

use inference_core::{Error as CoreError, GenerateMetrics};

use super::{Ending, Scheduler};
use crate::backend::NAME;
use crate::backend::mirror::Failure;

impl Scheduler {
    /// Records that generation `seq` failed on this rank with `error` (a mirrored scheduler).
    pub(super) fn failed_here(&mut self, seq: u64, error: String) {
        self.failed.push(Failure { seq, error });
    }

    /// Records every generation this scheduler holds as failed with `message` (a caught
    /// panic ends them all here at once; the other ranks end them at the next exchange).
    pub(super) fn record_all_failed(&mut self, message: &str) {
        let waiting = self.waiting.iter().map(|(seq, _)| *seq);
        let prefilling = self.prefilling.iter().map(|p| p.row.seq);
        let batch = self.batch.iter().flat_map(|b| b.rows.iter().map(|r| r.seq));
        let seqs: Vec<u64> = waiting.chain(prefilling).chain(batch).collect();
        self.failed.extend(seqs.into_iter().map(|seq| Failure { seq, error: message.to_owned() }));
    }

    /// The generations that failed on this rank since the last call.
    pub(crate) fn take_failed(&mut self) -> Vec<Failure> {
        std::mem::take(&mut self.failed)
    }

    /// Ends the generations in `ends` (by order number, each with the message of its error)
    /// wherever they are, and tells them; returns those it no longer held.
    pub(crate) fn end_with(&mut self, ends: &[(u64, String)], last_metrics: &Arc<Mutex<GenerateMetrics>>) -> Vec<u64> {
        let error = |seq: u64| {
            ends.iter().find(|(s, _)| *s == seq).map(|(_, message)| CoreError::backend(NAME, message.clone()))
        };
        let found = self.end(&error);
        self.publish_and_end(None, last_metrics);
        ends.iter().map(|(seq, _)| *seq).filter(|seq| !found.contains(seq)).collect()
    }

    /// Ends every generation for which `error` gives an error, wherever it is; returns their
    /// order numbers.
    pub(super) fn end(&mut self, error: &dyn Fn(u64) -> Option<CoreError>) -> Vec<u64> {
        let mut found = Vec::new();
        for (seq, req) in std::mem::take(&mut self.waiting) {
            match error(seq) {
                Some(e) => {
                    found.push(seq);
                    self.ending.push(Ending::Refused(req.sink, e, req.session));
                }
                None => self.waiting.push_back((seq, req)),
            }
        }
        for p in std::mem::take(&mut self.prefilling) {
            match error(p.row.seq) {
                Some(e) => {
                    found.push(p.row.seq);
                    self.ending.push(Ending::Row(Box::new(p.into_row()), Some(e)));
                }
                None => self.prefilling.push_back(p),
            }
        }
        let Some(batch) = &self.batch else { return found };
        let (mut keep, mut done) = (Vec::new(), Vec::new());
        for (pos, row) in batch.rows.iter().enumerate() {
            match error(row.seq) {
                Some(e) => {
                    found.push(row.seq);
                    done.push((pos, Some(e)));
                }
                None => keep.push(pos),
            }
        }
        if !done.is_empty() {
            let pending = batch.pending.clone();
            if let Err(e) = self.settle(done, &keep, Some(pending), None) {
                self.fail_batch(&e);
            }
        }
        found
    }
}
