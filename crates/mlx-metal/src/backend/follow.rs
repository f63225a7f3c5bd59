// SPDX-License-Identifier: EUPL-1.2
//! The loop of a tensor-parallel rank other than 0 ([`MetalModel::follow`](super::MetalModel::follow)):
//! rank 0's jobs, received in order (`mirror.rs`), run on this rank's shard until rank 0 shuts
//! down. Each job runs under `catch_unwind` as the engine's own jobs do (`supervise.rs`): a
//! panic ends every generation this rank holds, they are reported to rank 0 at the next
//! exchange, and the rank goes on following.

use inference_core::{
    CancelToken, Error as CoreError, GenerateSettings, LogitsMode, Result as CoreResult, TokenStream,
};

use super::engine::Engine;
use super::mirror::Request;
use super::supervise::{failpoint, guarded};
use super::{NAME, core_err};

impl Engine {
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
        loop {
            let own = self.scheduler.take_failed();
            let (request, failures) = match &self.mirror {
                Some(m) => m.receive(&own).map_err(|e| {
                    CoreError::backend(
                        NAME,
                        format!(
                            "tensor-parallel rank {rank} failed to receive rank 0's next job (the ranks are out of \
                             step): {}",
                            core_err(e)
                        ),
                    )
                })?,
                None => return Ok(()),
            };
            self.end_failed(&failures);
            if matches!(request, Request::Shutdown) {
                return Ok(());
            }
            if matches!(request, Request::Step { .. }) && failpoint("mirror.hang") {
                eprintln!("mlx-metal: tensor-parallel rank {rank}: fail point mirror.hang: this rank hangs");
                loop {
                    std::thread::park();
                }
            }
            guarded(self, "a mirrored job", |e| e.run_mirrored(request, rank));
        }
    }

    /// Runs one of rank 0's jobs on this rank.
    fn run_mirrored(&mut self, request: Request, rank: i32) {
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
            Request::Step { plan } => {
                self.run_step(&plan);
                // After the step's collectives, as a bug in handing out tokens would.
                if failpoint("mirror.panic") {
                    panic!("fail point mirror.panic");
                }
            }
            Request::Cancel { generations } => self.retire(&generations),
            // Rank 0 reports a failure on any rank to its caller; every rank goes on.
            Request::Inspect { ids } => {
                if let Err(e) = self.inspect_everywhere(&ids, String::new()) {
                    tracing::warn!(rank, error = %e.report(), "an attention inspection failed");
                }
            }
            Request::SetAdapter { dir } => {
                // A failed swap leaves every rank without an adapter, in step.
                if let Err(e) = self.swap_adapter(dir) {
                    eprintln!("mlx-metal: tensor-parallel rank {rank}: {e}");
                }
            }
            Request::Shutdown => {}
        }
    }
}
