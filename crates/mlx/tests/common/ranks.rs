// SPDX-License-Identifier: EUPL-1.2
//! Multi-process tests: a test binary re-executes itself as the ranks of a
//! job over MLX's ring backend on loopback. The binary's ignored test
//! `rank_process` is a rank's entry point, and the environment variable
//! [`ROLE`] says what the rank does; each rank prints `RESULT <json>` lines
//! that the parent reads back ([`result_of`]). Used by `crates/mlx`'s
//! collective tests and `crates/mlx-metal`'s tensor-parallel ones.

use std::ffi::OsString;
use std::time::Duration;

use mlx::distributed::launch::{self, LaunchSpec, RankOutput};
use mlx::distributed::{self, Backend, Group, InitOptions};
use serde_json::Value;

/// What a rank process does (read by the binary's `rank_process`).
pub(crate) const ROLE: &str = "MLXR_DIST_TEST_ROLE";
/// How long a rank waits for the others to join, in milliseconds.
pub(crate) const INIT_MS: &str = "MLXR_DIST_TEST_INIT_MS";

/// The test-harness arguments that run only `rank_process`.
pub(crate) fn rank_args() -> Vec<OsString> {
    ["rank_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"].map(OsString::from).to_vec()
}

/// A job of `ranks` copies of this test binary, each running `role`.
pub(crate) fn spec(role: &str, ranks: usize) -> LaunchSpec {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut spec = LaunchSpec::ring(exe, rank_args(), ranks);
    spec.env.push((ROLE.into(), role.into()));
    spec.timeout = Some(Duration::from_secs(50));
    spec
}

/// Multi-process tests run one at a time: their ranks find free loopback
/// ports by binding and releasing them, and a lone rank retries its
/// connection, so two jobs at once could meet on the same port.
pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    static JOBS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    JOBS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs a job of `ranks` ranks in `role` to its end.
pub(crate) fn run_job(role: &str, ranks: usize) -> Vec<RankOutput> {
    run_job_with(role, ranks, &[])
}

/// [`run_job`] with extra environment variables for every rank.
pub(crate) fn run_job_with(role: &str, ranks: usize, env: &[(&str, &str)]) -> Vec<RankOutput> {
    let mut s = spec(role, ranks);
    s.env.extend(env.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))));
    launch::spawn(&s).and_then(launch::Job::wait).unwrap_or_else(|e| panic!("job {role}: {e}"))
}

/// The `RESULT` line of a rank's stdout.
pub(crate) fn result_of(out: &RankOutput) -> Value {
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("rank {} printed no RESULT line; stdout:\n{}", out.rank, out.stdout));
    serde_json::from_str(line).expect("a RESULT line is JSON")
}

/// The deadline for joining the group ([`INIT_MS`], 20 s by default).
pub(crate) fn init_timeout() -> Duration {
    let ms = std::env::var(INIT_MS).ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    Duration::from_millis(ms)
}

/// Joins the ring group of this job, or exits with status 2 saying why.
pub(crate) fn join_ring() -> Group {
    distributed::init(&InitOptions::strict(Backend::Ring).timeout(init_timeout())).unwrap_or_else(|e| {
        eprintln!("rank failed to join: {e}");
        std::process::exit(2)
    })
}
