// SPDX-License-Identifier: EUPL-1.2
//! The engine thread's loop, and what keeps a panic in it from taking the
//! model down.
//!
//! Each job and each scheduler step runs under `catch_unwind`. A panic is a
//! bug, so nothing of the state it cut short is trusted: every generation the
//! engine holds (waiting, prefilling or decoding, the adapters' too) ends with
//! an error that says so, the panic goes to the log, and the engine goes on
//! with the next job. The model's weights are not touched by a step (an
//! adapter's layers are swapped back by a guard as the panic unwinds). A job
//! that panicked drops its reply channel, so its caller gets an error too.
//! [`EngineLoad::caught_panics`](inference_core::EngineLoad) counts them.
//!
//! If the thread ends anyway (it should not), [`MetalModel::health`]
//! (`TextModel::health`) says so and a server stops.
//!
//! Fail points, for tests only: `MLXR_FAILPOINTS` lists names (comma
//! separated) of places that panic once, the first time they are reached:
//! `engine.step` (a scheduler step), `engine.job` (a job), `engine.exit` (the
//! loop ends at the next job, as if the thread had died); in a tensor-parallel
//! job also `mirror.emit` (the next token a row hands out fails, as a
//! detokeniser or a constraint could: an error, not a panic), `mirror.admit`
//! (the next request admitted cannot start), `mirror.adapter` and
//! `mirror.inspect` (the next adapter swap or attention inspection fails,
//! after its collectives), `mirror.panic` (a rank other than 0 panics after
//! the next step it runs) and `mirror.hang` (a rank other than 0 hangs at the
//! next step it receives). `NAME@RANK` fires
//! only on that tensor-parallel rank (every rank gets the launcher's
//! environment). Unset, each place costs one look at an empty set.
//!
//! On rank 0 of a tensor-parallel job every job and step is watched by the
//! step watchdog (`watchdog.rs`).
//!
//! [`MetalModel::health`]: super::MetalModel

use std::any::Any;
use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use super::engine::Engine;
use super::watchdog::Watchdog;
use super::{Job, lock};

/// The engine thread's loop: jobs as they come (each after the rows it
/// cancelled have left), and a scheduler step whenever no job waits. It
/// sleeps on the channel only when the scheduler is idle, and ends when the
/// model is closed and the last generation has finished. Rank 0 of a
/// tensor-parallel job has a `watchdog`, which watches each job and step.
pub(super) fn run_engine(engine: &mut Engine, jobs: &mpsc::Receiver<Job>, watchdog: Option<&Watchdog>) {
    loop {
        let job = if engine.is_idle() {
            // Nothing to do: a moment to write the prompt cache's new entries.
            engine.scheduler.persist_prompt_cache();
            match jobs.recv() {
                Ok(job) => job,
                Err(mpsc::RecvError) => return,
            }
        } else {
            match jobs.try_recv() {
                Ok(job) => job,
                Err(mpsc::TryRecvError::Empty | mpsc::TryRecvError::Disconnected) => {
                    let _watched = watchdog.map(|w| w.watch("a scheduler step"));
                    guarded(engine, "step", |e| {
                        if failpoint("engine.step") {
                            panic!("fail point engine.step");
                        }
                        e.step();
                    });
                    continue;
                }
            }
        };
        if failpoint("engine.exit") {
            tracing::error!("fail point engine.exit: the engine loop ends");
            return;
        }
        let _watched = watchdog.map(|w| w.watch("a job"));
        guarded(engine, "job", |e| {
            e.before_job();
            if failpoint("engine.job") {
                panic!("fail point engine.job");
            }
            job(e);
        });
    }
}

/// Runs `f`; a panic in it fails everything the engine holds (see the module docs).
pub(super) fn guarded(engine: &mut Engine, what: &str, f: impl FnOnce(&mut Engine)) {
    let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(engine))) else { return };
    let cause = panic_message(payload.as_ref());
    tracing::error!(what, panic = %cause, "the engine caught a panic; the generations it held have failed");
    let message = format!("the engine failed ({what}: {cause}); the generations it held at the time were ended");
    // Failing rows only sends on their channels and drops arrays: it cannot panic
    // again, but is guarded all the same so that the loop itself never unwinds.
    let failed = catch_unwind(AssertUnwindSafe(|| {
        engine.scheduler.fail_all(&message, &engine.metrics);
        engine.fail_variants(&message);
        engine.after_drain.clear();
        engine.scheduler.release();
    }));
    if failed.is_err() {
        tracing::error!("failing the generations after a panic panicked too");
    }
    engine.scheduler.caught_panic();
}

/// The text a panic was raised with.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// This process's tensor-parallel rank, for fail points named `NAME@RANK`.
static RANK: OnceLock<i32> = OnceLock::new();

/// Says which tensor-parallel rank this process is (for fail points).
pub(super) fn set_failpoint_rank(rank: i32) {
    let _ = RANK.set(rank);
}

/// Whether the fail point `name` (or `name@RANK` on that rank) fires now (at most once per
/// process).
pub(super) fn failpoint(name: &str) -> bool {
    static ARMED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let names = std::env::var("MLXR_FAILPOINTS").unwrap_or_default();
        Mutex::new(names.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect())
    });
    let mut armed = lock(armed);
    !armed.is_empty() && (armed.remove(name) || RANK.get().is_some_and(|r| armed.remove(&format!("{name}@{r}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_message_is_read_from_either_payload() {
        let text = catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(text.as_ref()), "plain");
        let formatted = catch_unwind(|| panic!("{} {}", "formatted", 2)).unwrap_err();
        assert_eq!(panic_message(formatted.as_ref()), "formatted 2");
        let other = catch_unwind(|| std::panic::panic_any(7_u8)).unwrap_err();
        assert_eq!(panic_message(other.as_ref()), "a panic without a message");
    }
}
