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
//! went away) and travels in each step's plan, so every rank stops at the
//! same step.
//!
//! Failures of one rank's own: each announcement is an exchange
//! ([`Mirror::exchange`]) that carries rank 0's job out and every other
//! rank's report back — the generations that failed on that rank since the
//! last exchange ([`Failure`]: a token a row could not hand out, say). A
//! mirrored scheduler never ends a row for such an error on its own (the
//! other ranks would go on with it and fall out of step): it keeps the row
//! and records it, and right after the next exchange every rank ends every
//! recorded row, rank 0 with an error for its caller that names the rank.
//! Every rank then carries on. Jobs whose outcome rank 0 returns (an adapter
//! swap, an attention inspection) end with [`Mirror::agree`]: every rank's
//! outcome, so that rank 0 reports a failure on any rank. Rank 0's
//! [`Watchdog`] ends a job in which a rank hangs.

use std::path::PathBuf;
use std::time::Duration;

use inference_core::{AttentionSnapshot, Error as CoreError, GenerateSettings, Result as CoreResult};
use serde::{Deserialize, Serialize};

use crate::model::tp::TensorParallel;
use mlx::distributed::{all_gather, broadcast};
use mlx::{Array, Dtype, Error};

use super::engine::Engine;
use super::supervise::{failpoint, set_failpoint_rank};
use super::watchdog::Watchdog;
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

/// A generation that failed on one rank: every rank ends it at the next exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Failure {
    /// The generation, by the order it came in (the same on every rank).
    pub(crate) seq: u64,
    /// What went wrong.
    pub(crate) error: String,
}

/// Every rank's [`Failure`]s since the last exchange, by rank; the same list on every rank.
pub(crate) type Failures = Vec<(i32, Vec<Failure>)>;

/// The reports of an exchange: (rank, bytes) for every rank that sent one.
type Reports = Vec<(i32, Vec<u8>)>;

/// What rank 0 sends: its job and its own failures.
#[derive(Serialize)]
struct Outgoing<'a> {
    #[serde(skip_serializing_if = "<[Failure]>::is_empty")]
    failed: &'a [Failure],
    request: &'a Request,
}

/// What the other ranks receive.
#[derive(Deserialize)]
struct Incoming {
    #[serde(default)]
    failed: Vec<Failure>,
    request: Request,
}

/// This process's part in mirroring: its rank and the group.
pub(crate) struct Mirror {
    tp: TensorParallel,
    step_timeout: Duration,
}

impl Mirror {
    /// Mirroring over `tp`'s group; rank 0 lets a job or step take `step_timeout` at most.
    pub(crate) fn new(tp: TensorParallel, step_timeout: Duration) -> Mirror {
        set_failpoint_rank(tp.shard().rank);
        Mirror { tp, step_timeout }
    }

    /// Rank 0's watchdog (`None` on the other ranks).
    pub(crate) fn watchdog(&self) -> Option<Watchdog> {
        self.is_root().then(|| Watchdog::start(self.step_timeout, self.tp.shard().size))
    }

    /// This process's rank.
    pub(crate) fn rank(&self) -> i32 {
        self.tp.shard().rank
    }

    /// Whether this process is rank 0, the one that takes calls.
    pub(crate) fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Rank 0: sends `request` and its own `failed` generations to every
    /// other rank; returns every rank's failures.
    pub(crate) fn announce(&self, request: &Request, failed: &[Failure]) -> Result<Failures, Error> {
        let bytes = serde_json::to_vec(&Outgoing { failed, request })
            .map_err(|e| err(format!("cannot encode a job for the other ranks: {e}")))?;
        let (_, reports) = self.exchange(Some(&bytes), &[])?;
        let mut all = vec![(0, failed.to_vec())];
        all.extend(failures_of(reports)?);
        Ok(all)
    }

    /// The other ranks: waits for rank 0's next request, handing over this
    /// rank's `failed` generations; returns it with every rank's failures.
    pub(crate) fn receive(&self, failed: &[Failure]) -> Result<(Request, Failures), Error> {
        let report = if failed.is_empty() { Vec::new() } else { encode(failed)? };
        let (bytes, reports) = self.exchange(None, &report)?;
        let incoming: Incoming = serde_json::from_slice(&bytes).map_err(|e| {
            err(format!("rank {} cannot read rank 0's job ({e}); are every rank's mlxr builds the same?", self.rank()))
        })?;
        let mut all = vec![(0, incoming.failed)];
        all.extend(failures_of(reports)?);
        Ok((incoming.request, all))
    }

    /// Every rank, after a job whose outcome rank 0 returns: this rank's
    /// `failure` out, every rank's failures (rank, what) back, the same on every rank.
    pub(crate) fn agree(&self, failure: Option<&str>) -> Result<Vec<(i32, String)>, Error> {
        let (_, reports) = self.exchange(None, failure.unwrap_or_default().as_bytes())?;
        Ok(reports.into_iter().map(|(rank, bytes)| (rank, String::from_utf8_lossy(&bytes).into_owned())).collect())
    }

    /// Every rank, after admitting a step's requests: this rank's `failed`
    /// out, every rank's back, the same on every rank.
    pub(crate) fn agree_failures(&self, failed: &[Failure]) -> Result<Failures, Error> {
        let report = if failed.is_empty() { Vec::new() } else { encode(failed)? };
        failures_of(self.exchange(None, &report)?.1)
    }

    /// One exchange, the same collectives on every rank: each rank's two
    /// lengths gathered (rank 0's `payload`, every rank's `report`), rank
    /// 0's payload broadcast when it has one, and the reports gathered when
    /// any rank has one. Returns the payload and the non-empty reports by
    /// rank. With nothing to report it costs what a broadcast does: two
    /// small collectives.
    fn exchange(&self, payload: Option<&[u8]>, report: &[u8]) -> Result<(Vec<u8>, Reports), Error> {
        let group = self.tp.group();
        let size = usize::try_from(group.size()).unwrap_or(0);
        let length = |n: usize| i32::try_from(n).map_err(|_| err(format!("{n} bytes is too many for one exchange")));
        let mine = [length(payload.map_or(0, <[u8]>::len))?, length(report.len())?];
        let lengths = all_gather(&Array::from_slice(&mine, &[1, 2])?, group)?.to_vec::<i32>()?;
        if lengths.len() != 2 * size || lengths.iter().any(|&n| n < 0) {
            return Err(err(format!("the exchange's lengths are not lengths: {lengths:?}")));
        }
        let sent = lengths[0];
        let payload = match payload {
            _ if sent == 0 => Vec::new(),
            Some(bytes) if self.is_root() => {
                broadcast(&Array::from_slice(bytes, &[sent])?, 0, group)?.to_vec::<u8>()?
            }
            _ => broadcast(&mlx::ops::zeros(&[sent], Dtype::Uint8)?, 0, group)?.to_vec::<u8>()?,
        };
        let longest = lengths.iter().skip(1).step_by(2).copied().max().unwrap_or(0);
        if longest == 0 {
            return Ok((payload, Vec::new()));
        }
        let mut padded = report.to_vec();
        padded.resize(longest as usize, 0);
        let all = all_gather(&Array::from_slice(&padded, &[1, longest])?, group)?.to_vec::<u8>()?;
        let width = longest as usize;
        let reports = (0..size)
            .filter_map(|r| {
                let n = lengths[2 * r + 1] as usize;
                let start = r * width;
                (n > 0).then(|| (r as i32, all.get(start..start + n).unwrap_or_default().to_vec()))
            })
            .collect();
        Ok((payload, reports))
    }

    /// `settings` with a seed: rank 0 picks one when the request has none,
    /// so that every rank samples the same tokens.
    pub(crate) fn seeded(&self, mut settings: GenerateSettings) -> GenerateSettings {
        settings.seed = Some(settings.seed.unwrap_or_else(super::scheduler::fresh_seed));
        settings
    }
}

fn err(message: String) -> Error {
    Error::Mlx { op: OP, message }
}

fn encode(failed: &[Failure]) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(failed).map_err(|e| err(format!("cannot encode this rank's failures: {e}")))
}

/// The other ranks' reports, read.
fn failures_of(reports: Reports) -> Result<Failures, Error> {
    reports
        .into_iter()
        .map(|(rank, bytes)| {
            serde_json::from_slice(&bytes)
                .map(|failed| (rank, failed))
                .map_err(|e| err(format!("cannot read rank {rank}'s report ({e})")))
        })
        .collect()
}

impl Engine {
    /// Rank 0 of a tensor-parallel job: tells the other ranks to run the job
    /// `request()` describes (built only then), and ends the generations that
    /// failed on any rank since the last exchange. Nothing in a single
    /// process; an error on the other ranks, whose jobs come from rank 0.
    pub(super) fn announce(&mut self, request: impl FnOnce() -> Request) -> CoreResult<()> {
        let (own, sent) = match &self.mirror {
            None => return Ok(()),
            Some(m) if m.is_root() => {
                let own = self.scheduler.take_failed();
                let sent = m.announce(&request(), &own);
                (own, sent)
            }
            Some(m) => {
                return Err(CoreError::backend(
                    NAME,
                    format!(
                        "rank {} of a tensor-parallel job runs what rank 0 runs (MetalModel::follow); call rank 0's \
                         model",
                        m.rank()
                    ),
                ));
            }
        };
        match sent {
            Ok(failures) => {
                self.end_failed(&failures);
                Ok(())
            }
            Err(e) => {
                self.end_failed(&vec![(0, own)]);
                Err(core_err(e))
            }
        }
    }

    /// Ends, on this rank, every generation in `failures` (rank 0's caller
    /// gets the error, naming the rank it came from).
    pub(super) fn end_failed(&mut self, failures: &Failures) {
        let mut ends = Vec::new();
        for (from, failed) in failures {
            for f in failed {
                let error = match from {
                    0 => f.error.clone(),
                    r => {
                        format!("tensor-parallel rank {r} failed this generation, and every rank ended it: {}", f.error)
                    }
                };
                ends.push((f.seq, error));
            }
        }
        if ends.is_empty() {
            return;
        }
        let gone = self.scheduler.end_with(&ends, &self.metrics);
        self.take_back_sessions();
        if self.mirror.as_ref().is_some_and(Mirror::is_root) {
            for (seq, error) in ends {
                tracing::warn!(generation = seq, ended_before = gone.contains(&seq), %error, "a generation failed on a tensor-parallel rank");
            }
        }
    }

    /// In a tensor-parallel job, after a step admitted requests: ends here the
    /// ones that could not start on another rank (`refused` could not start
    /// here and have ended already), so that every rank prefills the same rows.
    pub(super) fn agree_on_admission(&mut self, refused: &[Failure]) {
        let Some(m) = &self.mirror else { return };
        match m.agree_failures(refused) {
            Ok(all) => {
                let elsewhere = all
                    .into_iter()
                    .map(|(rank, failed)| {
                        (rank, failed.into_iter().filter(|f| !refused.iter().any(|r| r.seq == f.seq)).collect())
                    })
                    .collect();
                self.end_failed(&elsewhere);
            }
            // A collective failed: a rank died, and the launcher ends the job.
            Err(e) => {
                tracing::error!(error = %e, "the tensor-parallel ranks could not agree on the requests they admitted")
            }
        }
    }

    /// Swaps the LoRA adapter; in a tensor-parallel job every rank then says
    /// how its swap went, and when it failed on any, every rank is left
    /// without an adapter (as the failing rank is) and the error names it.
    pub(super) fn swap_adapter(&mut self, dir: Option<PathBuf>) -> CoreResult<()> {
        let fails_here = self.mirror.is_some() && failpoint("mirror.adapter");
        let mine = if fails_here {
            self.set_adapter(None).and(Err(CoreError::backend(NAME, "fail point mirror.adapter")))
        } else {
            self.set_adapter(dir)
        };
        let Some(m) = &self.mirror else { return mine };
        let failures = m.agree(mine.as_ref().err().map(ToString::to_string).as_deref()).map_err(core_err)?;
        let Some((rank, why)) = failures.into_iter().next() else { return mine };
        if mine.is_ok() {
            self.set_adapter(None)?;
        }
        mine?;
        Err(CoreError::backend(
            NAME,
            format!("the adapter swap failed on tensor-parallel rank {rank}, so every rank is left without one: {why}"),
        ))
    }

    /// An attention inspection; in a tensor-parallel job every rank then says
    /// how its part went, and a failure on any is the error.
    pub(super) fn inspect_everywhere(&mut self, ids: &[u32], architecture: String) -> CoreResult<AttentionSnapshot> {
        let mine = self.inspect(ids, architecture).map_err(core_err);
        let Some(m) = &self.mirror else { return mine };
        let mine = match mine {
            Ok(_) if failpoint("mirror.inspect") => Err(CoreError::backend(NAME, "fail point mirror.inspect")),
            mine => mine,
        };
        let failures = m.agree(mine.as_ref().err().map(ToString::to_string).as_deref()).map_err(core_err)?;
        let mine = mine?;
        match failures.into_iter().next() {
            None => Ok(mine),
            Some((rank, why)) => Err(CoreError::backend(
                NAME,
                format!("the attention inspection failed on tensor-parallel rank {rank}: {why}"),
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

    #[test]
    fn a_job_travels_with_rank_0_s_failures_and_reports_come_back() {
        let request = Request::Step { plan: super::super::scheduler::Plan { admit: 1, cancel: vec![4] } };
        let failed = vec![Failure { seq: 3, error: "scheduler: boom".into() }];
        let bytes = serde_json::to_vec(&Outgoing { failed: &failed, request: &request }).expect("encodes");
        let back: Incoming = serde_json::from_slice(&bytes).expect("decodes");
        assert_eq!((back.failed, back.request), (failed.clone(), request.clone()));
        // Nothing failed: the job alone, as before.
        let bare = serde_json::to_vec(&Outgoing { failed: &[], request: &request }).expect("encodes");
        assert!(!String::from_utf8_lossy(&bare).contains("failed"));
        let back: Incoming = serde_json::from_slice(&bare).expect("decodes");
        assert!(back.failed.is_empty());
        let reports = vec![(1, encode(&failed).expect("encodes"))];
        assert_eq!(failures_of(reports).expect("reads"), vec![(1, failed)]);
        let e = failures_of(vec![(2, b"nope".to_vec())]).expect_err("not a report").to_string();
        assert!(e.contains("cannot read rank 2's report"), "{e}");
    }
}
