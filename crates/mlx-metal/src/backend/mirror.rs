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

use std::path::PathBuf;

use inference_core::{
    CancelToken, Error as CoreError, GenerateSettings, LogitsMode, Result as CoreResult, TokenStream,
};
use serde::{Deserialize, Serialize};

use crate::model::tp::TensorParallel;
use mlx::Error;
use mlx::distributed::broadcast_bytes;

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
    /// A batch generation (the prompts that encoded on rank 0).
    Batch {
        /// Each row's token ids.
        prompts: Vec<Vec<u32>>,
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
    /// Generations that rank 0 ends between steps (their callers cancelled).
    Cancel {
        /// The generations, by the order they came in.
        generations: Vec<u64>,
    },
    /// One scheduler step, as rank 0 planned it.
    Step {
        /// What it admits and cancels.
        plan: super::scheduler::Plan,
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
            // The output goes nowhere: a sink whose stream is gone (a mirrored
            // scheduler ignores failed sends; stopping is rank 0's plan).
            let sink = || TokenStream::unbounded_channel(CancelToken::new()).0;
            // Scores are rank 0's to hand out; here they would only be read back for nothing.
            let quiet = |mut s: GenerateSettings| {
                s.logits = LogitsMode::None;
                s
            };
            match request {
                Request::Generate { ids, settings } => self.submit_generation(ids, quiet(settings), sink()),
                Request::SessionTurn { session, ids, settings } => {
                    self.submit_session_turn(session, ids, quiet(settings), sink());
                }
                Request::EndSession { session } => self.when_session_free(
                    session,
                    Box::new(move |e: &mut Engine| {
                        e.sessions.remove(&session);
                    }),
                ),
                Request::Classify { prompts, settings } => {
                    self.submit_rows(prompts.into_iter().map(|p| (p, sink())).collect(), quiet(settings), true);
                }
                Request::Batch { prompts, settings } => {
                    self.submit_rows(prompts.into_iter().map(|p| (p, sink())).collect(), quiet(settings), false);
                }
                Request::Step { plan } => self.run_step(&plan),
                Request::Cancel { generations } => self.retire(&generations),
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
            Request::Batch { prompts: vec![vec![1], vec![2, 3]], settings },
            Request::Step { plan: super::super::scheduler::Plan { admit: 2, cancel: vec![7, 9] } },
            Request::Cancel { generations: vec![3] },
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
