// SPDX-License-Identifier: EUPL-1.2
//! Mirroring a tensor-parallel [`MetalModel`](super::MetalModel)'s jobs from
//! rank 0 to the other ranks (docs/distributed.md, "Using it from a program").
//!
//! Every block of a sharded model sums over the ranks, so every rank must run
//! the same model calls in the same order with the same inputs. Only rank 0
//! talks to callers: before its engine thread runs a job that touches the
//! model, it broadcasts a [`Request`] (token ids after tokenisation and
//! templating, the settings with a seed fixed on rank 0, the session id, ...)
//! with [`broadcast_bytes`]. The other ranks sit in
//! [`MetalModel::follow`](super::MetalModel::follow), receive each request and
//! run the same engine code, discarding the output, until rank 0 sends
//! [`Request::Shutdown`] (when its model is closed or dropped).
//!
//! Stopping is decided on rank 0 (cancellation, deadlines, a consumer that
//! went away) and shared through [`StopFlag`]: one `all_sum` of a one-element
//! int32 array per poll, to which only rank 0 contributes. The flag is
//! queued with `async_eval` at one poll and read at the next, so it never
//! waits for a model step the loop has queued ahead and every rank stops at
//! the same step (one step after rank 0 saw the cancellation).

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use inference_core::GenerateSettings;
use serde::{Deserialize, Serialize};

use crate::array::Array;
use crate::distributed::{self, TensorParallel, broadcast_bytes};
use crate::error::Error;
use crate::transforms::async_eval;

const OP: &str = "tensor_parallel_mirror";

/// One job of rank 0's engine thread, as the other ranks run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub(crate) enum Request {
    /// A generation from `ids` with fresh caches.
    Generate {
        /// The prompt's token ids.
        ids: Vec<u32>,
        /// The settings, with rank 0's seed.
        settings: GenerateSettings,
    },
    /// One turn of chat session `session` over the whole token sequence `ids`.
    SessionTurn {
        /// The session's id (rank 0's).
        session: u64,
        /// Every token of the conversation so far.
        ids: Vec<u32>,
        /// The settings, with rank 0's seed.
        settings: GenerateSettings,
    },
    /// Session `session` is reset or dropped: its caches go.
    EndSession {
        /// The session's id.
        session: u64,
    },
    /// Classification of the prompts.
    Classify {
        /// Each prompt's token ids.
        prompts: Vec<Vec<u32>>,
        /// The settings, with rank 0's seed.
        settings: GenerateSettings,
    },
    /// A batch generation; `None` rows failed to encode on rank 0 and do not run.
    Batch {
        /// Each row's token ids.
        prompts: Vec<Option<Vec<u32>>>,
        /// The settings, with rank 0's seed.
        settings: GenerateSettings,
    },
    /// One prefill with attention taps.
    Inspect {
        /// The prompt's token ids.
        ids: Vec<u32>,
    },
    /// A LoRA adapter swap (the directory must be readable on every rank).
    SetAdapter {
        /// The adapter directory, or `None` to remove the adapter.
        dir: Option<PathBuf>,
    },
    /// Rank 0's model was closed: the other ranks leave their loop.
    Shutdown,
}

/// This process's part in mirroring: its rank and the group.
pub(crate) struct Mirror {
    tp: TensorParallel,
}

impl Mirror {
    /// Mirroring over `tp`'s group.
    pub(crate) fn new(tp: TensorParallel) -> Mirror {
        Mirror { tp }
    }

    /// This process's rank.
    pub(crate) fn rank(&self) -> i32 {
        self.tp.shard().rank
    }

    /// Whether this process is rank 0, the one that takes calls.
    pub(crate) fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Rank 0: sends `request` to every other rank.
    pub(crate) fn announce(&self, request: &Request) -> Result<(), Error> {
        let bytes = serde_json::to_vec(request)
            .map_err(|e| Error::Mlx { op: OP, message: format!("cannot encode a job for the other ranks: {e}") })?;
        broadcast_bytes(&bytes, 0, self.tp.group())?;
        Ok(())
    }

    /// The other ranks: waits for rank 0's next request.
    pub(crate) fn receive(&self) -> Result<Request, Error> {
        let bytes = broadcast_bytes(&[], 0, self.tp.group())?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Mlx {
            op: OP,
            message: format!(
                "rank {} cannot read rank 0's job ({e}); are every rank's mlxr builds the same?",
                self.rank()
            ),
        })
    }

    /// `settings` with a seed: rank 0 picks one when the request has none,
    /// so that every rank samples the same tokens.
    pub(crate) fn seeded(&self, mut settings: GenerateSettings) -> GenerateSettings {
        if settings.seed.is_none() {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default();
            settings.seed = Some(now ^ NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
        }
        settings
    }

    /// A stop flag shared by every rank; `local` is read on rank 0 only.
    pub(crate) fn stop_flag<'a>(&'a self, local: &'a dyn Fn() -> bool) -> StopFlag<'a> {
        StopFlag { tp: &self.tp, local, pending: RefCell::new(None), error: RefCell::new(None) }
    }
}

/// Rank 0's decision to stop, the same on every rank at the same poll.
///
/// [`poll`](StopFlag::poll) reads the flag queued at the previous poll and
/// queues the next one; every rank must poll exactly as often, which the
/// generation loops do since they run the same steps. A failed collective
/// reads as "stop" and is kept for [`StopFlag::check`].
pub(crate) struct StopFlag<'a> {
    tp: &'a TensorParallel,
    local: &'a dyn Fn() -> bool,
    pending: RefCell<Option<Array>>,
    error: RefCell<Option<Error>>,
}

impl StopFlag<'_> {
    /// Whether every rank stops now.
    pub(crate) fn poll(&self) -> bool {
        if self.error.borrow().is_some() {
            return true;
        }
        let previous = self.pending.borrow_mut().take();
        if let Some(flag) = previous {
            match flag.item::<i32>() {
                Ok(0) => {}
                Ok(_) => return true,
                Err(e) => return self.fail(e),
            }
        }
        let mine = i32::from(self.tp.shard().rank == 0 && (self.local)());
        let next = Array::from_slice(&[mine], &[1])
            .and_then(|a| distributed::all_sum(&a, self.tp.group()))
            .and_then(|f| async_eval(&[&f]).map(|()| f));
        match next {
            Ok(f) => {
                *self.pending.borrow_mut() = Some(f);
                false
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(&self, e: Error) -> bool {
        *self.error.borrow_mut() = Some(e);
        true
    }

    /// The error of a failed collective, if any.
    pub(crate) fn check(&self) -> Result<(), Error> {
        match self.error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_json() {
        let settings = GenerateSettings::default().max_tokens(3).stop_strings(["x".to_owned()]);
        for r in [
            Request::Generate { ids: vec![1, 2, 3], settings: settings.clone() },
            Request::SessionTurn { session: 7, ids: vec![4], settings: settings.clone() },
            Request::EndSession { session: 7 },
            Request::Classify { prompts: vec![vec![1], vec![2, 3]], settings: settings.clone() },
            Request::Batch { prompts: vec![Some(vec![1]), None], settings },
            Request::Inspect { ids: vec![9] },
            Request::SetAdapter { dir: Some(PathBuf::from("/a")) },
            Request::SetAdapter { dir: None },
            Request::Shutdown,
        ] {
            let bytes = serde_json::to_vec(&r).expect("encodes");
            let back: Request = serde_json::from_slice(&bytes).expect("decodes");
            assert_eq!(back, r);
        }
    }
}
