// SPDX-License-Identifier: EUPL-1.2
//! Rank 0's step watchdog in a tensor-parallel job.
//!
//! Every job and scheduler step on rank 0 talks to the other ranks through
//! collectives (the broadcast of what it runs, the blocks' sums), and MLX's
//! collectives wait for every rank without a deadline and cannot be
//! cancelled. A rank that hangs — stuck in its own code, or out of step so
//! that it waits in another collective — would hold rank 0, and so the
//! server and every client, forever. The watchdog is a thread that knows
//! when rank 0's engine thread started its current job or step; when one
//! takes longer than the deadline (the load option `tp_step_timeout_s`), it
//! writes an error that names what was running and the ranks that did not
//! take part, and ends the process at once with exit status 1
//! ([`mlx::distributed::signals::exit_now`]: exit handlers could wait on the
//! blocked threads). The launcher then ends the other ranks and exits
//! unsuccessfully with rank 0's message.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::lock;

/// The exit status of a job the watchdog ended.
pub(crate) const EXIT_STATUS: i32 = 1;

#[derive(Default)]
struct State {
    /// What the engine thread runs, since when.
    busy: Option<(Instant, &'static str)>,
    /// The watchdog was dropped: its thread ends.
    closed: bool,
}

/// Rank 0's watchdog (see the module docs); its thread ends when it drops.
pub(crate) struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
}

/// A job or step being watched: its watch ends when this drops.
pub(crate) struct Watched<'a> {
    watchdog: &'a Watchdog,
}

impl Watchdog {
    /// Starts the watchdog of rank 0 of `ranks` ranks, with `deadline` per job or step.
    pub(crate) fn start(deadline: Duration, ranks: i32) -> Watchdog {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let watched = Arc::clone(&shared);
        let spawned =
            std::thread::Builder::new().name("mlx-tp-watchdog".into()).spawn(move || watch(&watched, deadline, ranks));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the tensor-parallel step watchdog; a hung rank will not be caught");
        }
        Watchdog { shared }
    }

    /// Watches `what` (a job, a step) until the returned guard drops.
    pub(crate) fn watch(&self, what: &'static str) -> Watched<'_> {
        let (state, wake) = &*self.shared;
        let mut s = lock(state);
        s.busy = Some((Instant::now(), what));
        wake.notify_all();
        Watched { watchdog: self }
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        lock(&self.watchdog.shared.0).busy = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (state, wake) = &*self.shared;
        lock(state).closed = true;
        wake.notify_all();
    }
}

/// The watchdog thread: waits for a job or step, then for its deadline.
fn watch(shared: &(Mutex<State>, Condvar), deadline: Duration, ranks: i32) {
    let (state, wake) = shared;
    let mut s = lock(state);
    loop {
        if s.closed {
            return;
        }
        let Some((since, what)) = s.busy else {
            s = wake.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        };
        let left = deadline.saturating_sub(since.elapsed());
        if left.is_zero() {
            let message = expired(what, deadline, ranks);
            tracing::error!("{message}");
            mlx::distributed::signals::exit_now(&format!("mlx-metal: {message}"), EXIT_STATUS);
        }
        s = wake.wait_timeout(s, left).map(|(s, _)| s).unwrap_or_else(|p| p.into_inner().0);
    }
}

/// What the watchdog says when `what` ran past `deadline`.
fn expired(what: &str, deadline: Duration, ranks: i32) -> String {
    let others = match ranks {
        ..=2 => "rank 1".to_owned(),
        n => format!("one of ranks 1 to {}", n - 1),
    };
    format!(
        "tensor-parallel rank 0: {what} did not finish within {} s: {others} did not take part (it hangs, \
         or the ranks are out of step); ending the job (tp_step_timeout_s sets the limit)",
        deadline.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_what_ran_and_the_other_ranks() {
        let two = expired("a scheduler step", Duration::from_secs(5), 2);
        assert!(
            two.starts_with(
                "tensor-parallel rank 0: a scheduler step did not finish within 5 s: rank 1 did not take part"
            ),
            "{two}"
        );
        let four = expired("a job", Duration::from_millis(2500), 4);
        assert!(four.contains("a job did not finish within 2.5 s: one of ranks 1 to 3 did not take part"), "{four}");
    }

    #[test]
    fn a_job_within_its_deadline_ends_its_watch() {
        let dog = Watchdog::start(Duration::from_secs(60), 2);
        for _ in 0..3 {
            let _watched = dog.watch("step");
        }
        assert!(lock(&dog.shared.0).busy.is_none());
        let watched = dog.watch("a job");
        assert_eq!(lock(&dog.shared.0).busy.map(|(_, what)| what), Some("a job"));
        drop(watched);
        assert!(lock(&dog.shared.0).busy.is_none());
    }
}
