// SPDX-License-Identifier: EUPL-1.2
//! `--tensor-parallel N`: one command over N processes on this machine.
//!
//! Started by hand, the command starts N copies of itself with the same arguments (mlx-metal's
//! launcher: `MLX_RANK` and the backend's environment per rank), shows rank 0's standard output
//! and standard error as they come, and waits: the first rank that fails ends the job. Ctrl-C or SIGTERM to the launcher is passed on to rank 0, which finishes as it would
//! alone (the server stops accepting and cancels running generations) and closes its model,
//! which tells the other ranks to stop. In each copy, rank 0 runs the command itself (loads its
//! shard, prints or serves: only it binds the port), and the other ranks load theirs and follow
//! rank 0's jobs (`MetalModel::follow`) until rank 0 closes its model. The ranks ignore Ctrl-C
//! (the terminal sends it to all of them; the launcher passes it to rank 0) and exit when the
//! launcher has gone. A generation that fails on one rank fails on rank 0 with an error naming
//! it, and every rank goes on; a rank that hangs makes rank 0 end the job after `--step-timeout`
//! (the launcher then exits unsuccessfully with rank 0's message).

use std::ffi::OsString;

use crate::args::{ModelArgs, TensorParallelArgs};
use crate::failure::Failure;

/// How the launcher treats rank 0's terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Terminal {
    /// Rank 0 prints (generate) or serves: its stdout and stderr are ours, and Ctrl-C ends the
    /// job.
    Batch,
    /// Rank 0 converses (chat): it also reads our stdin, and Ctrl-C reaches it directly (it
    /// cancels the current turn); SIGTERM ends the job.
    Interactive,
}

/// Runs `lead` in this process alone, or as rank 0 of a tensor-parallel job (launching the job
/// first when this process was started by hand). `env` goes to every rank.
pub(crate) fn run(
    tp: &TensorParallelArgs,
    model: &ModelArgs,
    env: Vec<(OsString, OsString)>,
    terminal: Terminal,
    lead: impl FnOnce() -> Result<(), Failure>,
) -> Result<(), Failure> {
    if tp.tensor_parallel <= 1 {
        return lead();
    }
    if let Some(backend) = model.backend.as_deref().filter(|b| *b != "metal") {
        return Err(Failure::new(format!(
            "--tensor-parallel needs the metal backend; --backend {backend} cannot split a model"
        )));
    }
    for (flag, value) in [("--distributed-timeout", tp.distributed_timeout), ("--step-timeout", tp.step_timeout)] {
        if !value.is_finite() || value <= 0.0 || value >= 1e9 {
            return Err(Failure::new(format!("{flag} {value}: must be a positive number of seconds")));
        }
    }
    imp::run(tp, model, env, terminal, lead)
}

#[cfg(feature = "metal")]
mod imp {
    use std::ffi::OsString;
    use std::io::Write;

    use inference_core::TextModel;
    use mlx::distributed::launch::{self, LaunchSpec};
    use mlx::distributed::{Backend, signals};
    use mlx_metal::MetalModel;

    use super::Terminal;
    use crate::args::{ModelArgs, TensorParallelArgs};
    use crate::failure::{self, Failure};

    /// What a rank says when its launcher was killed outright.
    const LAUNCHER_GONE: &str = "mlxr: the tensor-parallel launcher has gone; this rank exits";

    fn err(e: mlx_metal::Error) -> Failure {
        Failure::new(e.to_string())
    }

    pub(super) fn run(
        tp: &TensorParallelArgs,
        model: &ModelArgs,
        env: Vec<(OsString, OsString)>,
        terminal: Terminal,
        lead: impl FnOnce() -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let backend: Backend = tp.distributed_backend.parse().map_err(err)?;
        match launch::rank_from_env().map_err(err)? {
            None => launch_job(tp.tensor_parallel as usize, backend, env, terminal),
            Some(0) => {
                signals::exit_with_launcher(LAUNCHER_GONE);
                lead()
            }
            Some(rank) => {
                signals::ignore_interrupts();
                signals::exit_with_launcher(LAUNCHER_GONE);
                follow(tp, model, rank)
            }
        }
    }

    /// Starts the ranks (this program, these arguments) and waits for them.
    fn launch_job(
        ranks: usize,
        backend: Backend,
        env: Vec<(OsString, OsString)>,
        terminal: Terminal,
    ) -> Result<(), Failure> {
        let program = std::env::current_exe().map_err(|e| failure::io("finding this program", e))?;
        let mut spec = LaunchSpec::ring(program, std::env::args_os().skip(1).collect(), ranks);
        spec.backend = backend;
        spec.env = env;
        spec.inherit_rank0_stdout = true;
        let interactive = terminal == Terminal::Interactive;
        spec.inherit_rank0_stdin = interactive;
        // Rank 0's messages (metrics, the server's log, a chat's notes) as they come.
        spec.echo_rank0_stderr = true;
        let _ = std::io::stdout().flush();
        let job = launch::spawn(&spec).map_err(err)?;
        if let Some(Some(pid)) = job.pids().first() {
            signals::forward_to_rank0(*pid, interactive);
        }
        job.wait().map_err(err)?;
        Ok(())
    }

    /// Ranks 1 and later: load this rank's shard and run rank 0's jobs until it closes its model.
    fn follow(tp: &TensorParallelArgs, model: &ModelArgs, rank: i32) -> Result<(), Failure> {
        let settings = tp.load_settings(model.load_settings());
        let loaded = MetalModel::load(&model.model, &settings)?;
        let followed = loaded.follow();
        let closed = loaded.close();
        followed.map_err(|e| Failure::new(format!("rank {rank}: {e}")))?;
        closed.map_err(Failure::from)
    }
}

#[cfg(not(feature = "metal"))]
mod imp {
    use std::ffi::OsString;

    use super::Terminal;
    use crate::args::{ModelArgs, TensorParallelArgs};
    use crate::failure::Failure;

    pub(super) fn run(
        _tp: &TensorParallelArgs,
        _model: &ModelArgs,
        _env: Vec<(OsString, OsString)>,
        _terminal: Terminal,
        _lead: impl FnOnce() -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        Err(Failure::new("--tensor-parallel needs mlxr built with the metal feature"))
    }
}
