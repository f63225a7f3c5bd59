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

use inference_core::{
    CancelToken, Error as CoreError, GenerateSettings, LogitsMode, Result as CoreResult, TokenStream,
};
use serde::{Deserialize, Serialize};

use crate::model::tp::TensorParallel;
use mlx::Array;
use mlx::Error;
use mlx::distributed::{self, broadcast_bytes};
use mlx::transforms::async_eval;

use super::engine::Engine;
use super::{NAME, core_err};

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
        settings.seed = Some(settings.seed.unwrap_or_else(super::scheduler::fresh_seed));
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

impl Engine {
    /// Rank 0 of a tensor-parallel job: tells the other ranks to run the job
    /// `request()` describes (built only then). Nothing in a single process;
    /// an error on the other ranks, whose jobs come from rank 0.
    pub(super) fn announce(&self, request: impl FnOnce() -> Request) -> CoreResult<()> {
        match &self.mirror {
            None => Ok(()),
            Some(m) if m.is_root() => m.announce(&request()).map_err(core_err),
            Some(m) => Err(CoreError::backend(
                NAME,
                format!(
                    "rank {} of a tensor-parallel job runs what rank 0 runs (MetalModel::follow); call rank 0's model",
                    m.rank()
                ),
            )),
        }
    }

    /// The settings a job runs with: in a tensor-parallel job, rank 0 fixes
    /// the seed so that every rank samples alike.
    pub(super) fn seeded(&self, settings: GenerateSettings) -> GenerateSettings {
        match &self.mirror {
            Some(m) => m.seeded(settings),
            None => settings,
        }
    }

    /// The loop of ranks 1 and later: rank 0's jobs until it shuts down.
    pub(super) fn follow(&mut self) -> CoreResult<()> {
        let rank = match &self.mirror {
            Some(m) if !m.is_root() => m.rank(),
            Some(_) => {
                return Err(CoreError::backend(
                    NAME,
                    "rank 0 of a tensor-parallel job takes calls; it does not follow",
                ));
            }
            None => return Err(CoreError::backend(NAME, "follow needs a model loaded as a tensor-parallel rank")),
        };
        let failed = |what: &str, e: CoreError| {
            CoreError::backend(
                NAME,
                format!("tensor-parallel rank {rank} failed {what} (the ranks are out of step): {e}"),
            )
        };
        loop {
            let request = match &self.mirror {
                Some(m) => m.receive().map_err(|e| failed("to receive rank 0's next job", core_err(e)))?,
                None => return Ok(()),
            };
            // The output goes nowhere: a sink whose stream is gone (sends fail
            // and are ignored in a tensor-parallel job; stopping is rank 0's).
            let (sink, _) = TokenStream::channel_with_capacity(CancelToken::new(), 0);
            let cancel = CancelToken::new();
            // Scores are rank 0's to hand out; here they would only be read back for nothing.
            let quiet = |mut s: GenerateSettings| {
                s.logits = LogitsMode::None;
                s
            };
            match request {
                Request::Generate { ids, settings } => {
                    self.generate_once(&ids, &quiet(settings), &sink).map_err(|e| failed("a generation", e))?;
                }
                Request::SessionTurn { session, ids, settings } => {
                    self.session_turn_once(session, &ids, &quiet(settings), &sink)
                        .map_err(|e| failed("a session turn", e))?;
                }
                Request::EndSession { session } => {
                    self.sessions.remove(&session);
                }
                Request::Classify { prompts, settings } => match self.classify(&prompts, &quiet(settings), &cancel) {
                    Ok(_) | Err(CoreError::Cancelled) => {}
                    Err(e) => return Err(failed("a classification", e)),
                },
                Request::Batch { prompts, settings } => {
                    let prompts = prompts.into_iter().map(|p| p.ok_or(CoreError::EmptyPrompt)).collect();
                    // Row errors are rank 0's to report; they are the same here.
                    self.batch_generate(prompts, &quiet(settings), &cancel);
                }
                Request::Inspect { ids } => {
                    self.inspect(&ids, String::new()).map_err(|e| failed("an attention inspection", core_err(e)))?;
                }
                Request::SetAdapter { dir } => {
                    // Rank 0 reports a bad adapter to its caller and is left without one; so is
                    // this rank, still in step.
                    if let Err(e) = self.set_adapter(dir) {
                        eprintln!("mlx-metal: tensor-parallel rank {rank}: the adapter swap failed as on rank 0: {e}");
                    }
                }
                Request::Shutdown => return Ok(()),
            }
        }
    }

    /// The stop decision of a generation: `local()` in a single process;
    /// rank 0's `local()`, shared with every rank, in a tensor-parallel job.
    pub(super) fn stop_flag<'a>(&'a self, local: &'a dyn Fn() -> bool) -> Stop<'a> {
        match &self.mirror {
            Some(m) => Stop::Shared(m.stop_flag(local)),
            None => Stop::Local(local),
        }
    }

    /// A session file holds one rank's caches only: refused in a tensor-parallel job.
    pub(super) fn refuse_session_files(&self) -> CoreResult<()> {
        match &self.mirror {
            Some(_) => Err(CoreError::backend(
                NAME,
                "saving and loading chat sessions is not supported for a tensor-parallel model (each rank holds \
                 only its own attention heads' caches)",
            )),
            None => Ok(()),
        }
    }
}

/// When a generation stops: decided here, or by rank 0 of a tensor-parallel job.
pub(super) enum Stop<'a> {
    Local(&'a dyn Fn() -> bool),
    Shared(StopFlag<'a>),
}

impl Stop<'_> {
    /// Whether to stop now (a collective per call in a tensor-parallel job).
    pub(super) fn poll(&self) -> bool {
        match self {
            Stop::Local(f) => f(),
            Stop::Shared(flag) => flag.poll(),
        }
    }

    /// The error of a failed collective, if any.
    pub(super) fn check(&self) -> Result<(), Error> {
        match self {
            Stop::Local(_) => Ok(()),
            Stop::Shared(flag) => flag.check(),
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
