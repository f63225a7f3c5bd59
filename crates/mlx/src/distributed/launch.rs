// SPDX-License-Identifier: EUPL-1.2
//! Starting the ranks of a job on this machine, `mlx.launch`-compatible.
//!
//! A launcher spawns N copies of a program with the environment MLX's
//! backends read: for the ring, `MLX_RANK` and `MLX_HOSTFILE` (a JSON list,
//! one entry per rank, each a list of `"ip:port"` addresses; see
//! [`loopback_hosts`]); for NCCL, `MLX_RANK`, `MLX_WORLD_SIZE`,
//! `NCCL_HOST_IP`, `NCCL_PORT`, `CUDA_VISIBLE_DEVICES` (one GPU per rank) and
//! `NCCL_NVLS_ENABLE=0`. The same program started by Python's `mlx.launch`
//! sees the same variables, so either launcher works.
//!
//! [`Job::wait`] watches every rank: the first rank that exits with a failure
//! (or is killed) ends the job — the other ranks are killed, since a
//! surviving rank would otherwise wait for its dead peer in a collective —
//! and the error names the rank, its exit status and the tail of its stderr.
//!
//! The launcher holds a fixed amount per rank however long the job runs:
//! rank 0's output goes through as it comes (its stdout inherited when asked,
//! its stderr echoed when asked), and of every stream only the last
//! [`LaunchSpec::output_tail`] bytes are kept ([`RankOutput`], error reports).
//! The ring hostfile lives in a private directory of its own (mode 0700, a
//! random name) that is removed with the [`Job`].

mod output;

pub use output::DEFAULT_OUTPUT_TAIL;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use self::output::{SharedTail, pump, shared, text_of};
use super::Backend;
use crate::error::{Error, Result};

const OP: &str = "distributed_launch";

/// The rank variable every backend reads.
pub const RANK_ENV: &str = "MLX_RANK";
/// The ring backend's hostfile variable.
pub const HOSTFILE_ENV: &str = "MLX_HOSTFILE";
/// The NCCL backend's world size variable.
pub const WORLD_SIZE_ENV: &str = "MLX_WORLD_SIZE";

/// The ring hostfile's name in the job's private directory.
const HOSTFILE_NAME: &str = "hostfile.json";

/// How much of a failed rank's stderr an error quotes.
const STDERR_TAIL: usize = 2000;

fn err(message: impl Into<String>) -> Error {
    Error::Mlx { op: OP, message: message.into() }
}

/// Ring addresses for `ranks` processes on loopback, one free port each:
/// `[["127.0.0.1:p0"], ["127.0.0.1:p1"], ...]`. The ports were free when
/// chosen (bound and released at once).
pub fn loopback_hosts(ranks: usize) -> Result<Vec<Vec<String>>> {
    let listeners = (0..ranks)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| err(format!("cannot find a free loopback port: {e}")))?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| vec![format!("127.0.0.1:{}", a.port())])
                .map_err(|e| err(format!("cannot read a bound port: {e}")))
        })
        .collect()
}

/// Writes a ring hostfile (the JSON `mlx.launch` writes), through
/// [`crate::io::write_durable_bytes`]: the file lands whole, and a link
/// planted at its name is replaced, never written through. [`spawn`] writes
/// it into a private directory of its own ([`private_dir`]).
pub fn write_hostfile(path: &Path, hosts: &[Vec<String>]) -> Result<()> {
    let text = serde_json::to_string(hosts).map_err(|e| err(format!("cannot encode the hostfile: {e}")))?;
    crate::io::write_durable_bytes(path, text.as_bytes()).map_err(|e| match e {
        Error::Io { path, source, .. } => Error::Io { op: OP, path, source },
        other => other,
    })
}

/// A fresh directory in the temporary directory for a job's files: created
/// at once (never an existing one), with an unpredictable name
/// (`mlxr-ring-XXXXXX`) and, on Unix, mode 0700, so no other user can read,
/// plant or replace anything in it. Removed when the returned value drops.
///
/// # Errors
/// The directory cannot be created (the error names the temporary directory).
pub fn private_dir() -> Result<TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("mlxr-ring-");
    // tempfile's directories are 0777 less the umask unless told otherwise.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
    builder.tempdir().map_err(|source| Error::Io { op: OP, path: std::env::temp_dir(), source })
}

/// How long the other ranks may run on after rank 0 has exited successfully.
pub const DEFAULT_FOLLOWER_GRACE: Duration = Duration::from_secs(30);

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The program every rank runs.
    pub program: PathBuf,
    /// Its arguments (the same for every rank).
    pub args: Vec<OsString>,
    /// How many ranks.
    pub ranks: usize,
    /// The backend whose environment is set: [`Backend::Ring`] (loopback
    /// hostfile) or [`Backend::Nccl`] (one GPU per rank).
    pub backend: Backend,
    /// Extra environment for every rank.
    pub env: Vec<(OsString, OsString)>,
    /// Rank 0's stdout goes to this process's stdout instead of being captured.
    pub inherit_rank0_stdout: bool,
    /// Rank 0 reads this process's stdin (the other ranks' is empty): an
    /// interactive program such as a chat.
    pub inherit_rank0_stdin: bool,
    /// Rank 0's stderr is copied to this process's stderr as it comes (its
    /// tail is kept for error messages as well).
    pub echo_rank0_stderr: bool,
    /// How many bytes of each rank's stdout and of its stderr are kept (the
    /// last ones) for [`RankOutput`] and error reports; the rest is dropped
    /// as it comes. Default [`DEFAULT_OUTPUT_TAIL`] (64 KiB).
    pub output_tail: usize,
    /// The whole job must end within this time; then every rank is killed.
    pub timeout: Option<Duration>,
    /// Once rank 0 has exited successfully, the other ranks must end within
    /// this time (a follower waits for rank 0's requests and would otherwise
    /// wait forever if rank 0 ended without telling it); then they are
    /// killed and the job fails. `None`: no limit. Default 30 s.
    pub follower_grace: Option<Duration>,
}

impl LaunchSpec {
    /// `ranks` copies of `program args` over the ring backend on loopback.
    pub fn ring(program: impl Into<PathBuf>, args: Vec<OsString>, ranks: usize) -> LaunchSpec {
        LaunchSpec {
            program: program.into(),
            args,
            ranks,
            backend: Backend::Ring,
            env: Vec::new(),
            inherit_rank0_stdout: false,
            inherit_rank0_stdin: false,
            echo_rank0_stderr: false,
            output_tail: DEFAULT_OUTPUT_TAIL,
            timeout: None,
            follower_grace: Some(DEFAULT_FOLLOWER_GRACE),
        }
    }
}

/// What one rank left behind.
#[derive(Debug, Clone)]
pub struct RankOutput {
    /// The rank.
    pub rank: usize,
    /// Its exit status.
    pub status: ExitStatus,
    /// The end of its stdout: the last [`LaunchSpec::output_tail`] bytes
    /// (empty when inherited).
    pub stdout: String,
    /// The end of its stderr: the last [`LaunchSpec::output_tail`] bytes.
    pub stderr: String,
}

/// A started job: every rank's process, watched until all end.
pub struct Job {
    children: Vec<Option<Child>>,
    open_pipes: Vec<usize>,
    /// A rank whose pipe reached its end.
    closed: mpsc::Receiver<usize>,
    stdout: Vec<SharedTail>,
    stderr: Vec<SharedTail>,
    /// The private directory that holds the ring hostfile.
    hostdir: Option<TempDir>,
    deadline: Option<Instant>,
    follower_grace: Option<Duration>,
}

/// Starts every rank of `spec`.
///
/// # Errors
/// A rank count below 1, a backend this launcher cannot set up (MPI and JACCL
/// need their own launchers), a hostfile that cannot be written or a process
/// that cannot be started (the ones already started are killed).
pub fn spawn(spec: &LaunchSpec) -> Result<Job> {
    if spec.ranks < 1 {
        return Err(err("a job needs at least one rank"));
    }
    let mut common: Vec<(OsString, OsString)> = Vec::new();
    let mut hostdir = None;
    match spec.backend {
        Backend::Ring | Backend::Any => {
            let dir = private_dir()?;
            let path = dir.path().join(HOSTFILE_NAME);
            write_hostfile(&path, &loopback_hosts(spec.ranks)?)?;
            common.push((HOSTFILE_ENV.into(), path.into()));
            hostdir = Some(dir);
        }
        Backend::Nccl => {
            let port = loopback_hosts(1)?
                .first()
                .and_then(|h| h.first())
                .and_then(|a| a.rsplit(':').next().map(str::to_string))
                .ok_or_else(|| err("cannot find a free port for NCCL"))?;
            common.push(("NCCL_HOST_IP".into(), "127.0.0.1".into()));
            common.push(("NCCL_PORT".into(), port.into()));
            common.push((WORLD_SIZE_ENV.into(), spec.ranks.to_string().into()));
            common.push(("NCCL_NVLS_ENABLE".into(), "0".into()));
        }
        b @ (Backend::Mpi | Backend::Jaccl) => {
            return Err(err(format!("the {b} backend is launched with its own tools (mpirun, mlx.launch)")));
        }
    }
    let (tx, closed) = mpsc::channel();
    let mut job = Job {
        children: Vec::with_capacity(spec.ranks),
        open_pipes: vec![0; spec.ranks],
        closed,
        stdout: (0..spec.ranks).map(|_| shared(spec.output_tail)).collect(),
        stderr: (0..spec.ranks).map(|_| shared(spec.output_tail)).collect(),
        hostdir,
        deadline: spec.timeout.map(|t| Instant::now() + t),
        follower_grace: spec.follower_grace,
    };
    for rank in 0..spec.ranks {
        let mut cmd = Command::new(&spec.program);
        let stdin = rank == 0 && spec.inherit_rank0_stdin;
        cmd.args(&spec.args).stdin(if stdin { Stdio::inherit() } else { Stdio::null() }).stderr(Stdio::piped());
        let inherit = rank == 0 && spec.inherit_rank0_stdout;
        cmd.stdout(if inherit { Stdio::inherit() } else { Stdio::piped() });
        cmd.envs(common.iter().map(|(k, v)| (k, v))).envs(spec.env.iter().map(|(k, v)| (k, v)));
        cmd.env(RANK_ENV, rank.to_string());
        if spec.backend == Backend::Nccl {
            cmd.env("CUDA_VISIBLE_DEVICES", rank.to_string());
        }
        let mut child =
            cmd.spawn().map_err(|e| err(format!("cannot start rank {rank} ({}): {e}", spec.program.display())))?;
        if let Some(out) = child.stdout.take() {
            job.open_pipes[rank] += 1;
            pump(rank, out, job.stdout[rank].clone(), false, tx.clone());
        }
        if let Some(e) = child.stderr.take() {
            job.open_pipes[rank] += 1;
            pump(rank, e, job.stderr[rank].clone(), rank == 0 && spec.echo_rank0_stderr, tx.clone());
        }
        job.children.push(Some(child));
    }
    Ok(job)
}

impl Job {
    /// The process ids of the ranks, in rank order (`None` for a rank that
    /// has ended): for passing a signal on, e.g. a launcher's Ctrl-C to rank 0.
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.children.iter().map(|c| c.as_ref().map(Child::id)).collect()
    }

    /// The ring hostfile the ranks were given (`MLX_HOSTFILE`), while the
    /// job holds it; `None` for other backends.
    pub fn hostfile(&self) -> Option<PathBuf> {
        self.hostdir.as_ref().map(|d| d.path().join(HOSTFILE_NAME))
    }

    /// Waits for every rank. The first rank to fail ends the job: the others
    /// are killed and the error names it.
    ///
    /// # Errors
    /// A rank exited unsuccessfully (its status and stderr tail), or the
    /// job's timeout passed (every rank is killed).
    pub fn wait(mut self) -> Result<Vec<RankOutput>> {
        let mut statuses: BTreeMap<usize, ExitStatus> = BTreeMap::new();
        let ranks = self.children.len();
        // Set when rank 0 has exited successfully: the others' deadline.
        let mut grace_end: Option<Instant> = None;
        while statuses.len() < ranks {
            let deadline = match (self.deadline, grace_end) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let rank = match deadline {
                Some(d) => match self.closed.recv_timeout(d.saturating_duration_since(Instant::now())) {
                    Ok(e) => e,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let running: Vec<String> =
                            (0..ranks).filter(|r| !statuses.contains_key(r)).map(|r| r.to_string()).collect();
                        self.kill_all();
                        let grace = self.follower_grace.unwrap_or_default().as_secs_f64();
                        return Err(err(if grace_end.is_some_and(|g| self.deadline.is_none_or(|d| g <= d)) {
                            format!(
                                "rank 0 finished but rank(s) {} were still running {grace:.0} s later (did rank 0 \
                                 close its model, which tells the others to stop?); killed them",
                                running.join(", ")
                            )
                        } else {
                            format!(
                                "the job did not finish in time; killed the ranks still running ({})",
                                running.join(", ")
                            )
                        }));
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match self.closed.recv() {
                    Ok(e) => e,
                    Err(_) => break,
                },
            };
            self.open_pipes[rank] = self.open_pipes[rank].saturating_sub(1);
            if self.open_pipes[rank] > 0 {
                continue;
            }
            // Both pipes closed: the process has exited (or is exiting).
            let status = match self.children[rank].as_mut().map(Child::wait) {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    self.kill_all();
                    return Err(err(format!("cannot wait for rank {rank}: {e}")));
                }
                None => continue,
            };
            self.children[rank] = None;
            statuses.insert(rank, status);
            if rank == 0 && status.success() {
                grace_end = self.follower_grace.map(|g| Instant::now() + g);
            }
            if !status.success() {
                self.kill_all();
                let stderr = text_of(&self.stderr[rank]);
                let tail = tail(&stderr, STDERR_TAIL);
                return Err(err(format!(
                    "rank {rank} of {ranks} failed ({status}); stopped the other ranks. Its stderr ends:\n{tail}"
                )));
            }
        }
        if statuses.len() < ranks {
            self.kill_all();
            return Err(err("lost track of the ranks' output pipes"));
        }
        Ok(statuses
            .into_iter()
            .map(|(rank, status)| RankOutput {
                rank,
                status,
                stdout: text_of(&self.stdout[rank]),
                stderr: text_of(&self.stderr[rank]),
            })
            .collect())
    }

    fn kill_all(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in &mut self.children {
            *c = None;
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill_all();
        // Best effort: the temporary directory may be gone already.
        drop(self.hostdir.take());
    }
}

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Whether this process was started as a rank by a launcher (`MLX_RANK` set).
pub fn is_rank_process() -> bool {
    std::env::var_os(RANK_ENV).is_some()
}

/// What [`launch_or_join`] made of this process.
#[derive(Debug)]
pub enum Role {
    /// This process is rank `.0` of a job: it should join the group (with
    /// [`super::init`], or by loading a model with the `tensor_parallel`
    /// backend option) on the thread that will use it.
    Rank(i32),
    /// This process launched the ranks and they all finished.
    Launched(Vec<RankOutput>),
}

/// This process's rank from the launcher's environment (`MLX_RANK`), if any.
///
/// # Errors
/// `MLX_RANK` is set but not a rank number.
pub fn rank_from_env() -> Result<Option<i32>> {
    match std::env::var(RANK_ENV) {
        Ok(v) => v
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|r| *r >= 0)
            .map(Some)
            .ok_or_else(|| err(format!("{RANK_ENV} = {v:?} is not a rank number"))),
        Err(_) => Ok(None),
    }
}

/// The entry point of a program that runs tensor-parallel: started by a
/// launcher (`MLX_RANK` set, by [`spawn`] or `mlx.launch`), it returns
/// [`Role::Rank`]; started by hand, it starts `ranks` copies of itself (same
/// arguments, rank 0's stdout shown, the others' output kept for errors) with
/// `backend`'s environment and returns [`Role::Launched`] once they all
/// succeed. `timeout` bounds the whole job.
///
/// # Errors
/// A rank failed or the job ran past `timeout` (see [`Job::wait`]).
pub fn launch_or_join(ranks: usize, backend: Backend, timeout: Option<Duration>) -> Result<Role> {
    if let Some(rank) = rank_from_env()? {
        return Ok(Role::Rank(rank));
    }
    let program = std::env::current_exe().map_err(|e| err(format!("cannot find this program: {e}")))?;
    let mut spec = LaunchSpec::ring(program, std::env::args_os().skip(1).collect(), ranks);
    spec.backend = backend;
    spec.timeout = timeout;
    spec.inherit_rank0_stdout = true;
    let _ = std::io::stdout().flush();
    spawn(&spec)?.wait().map(Role::Launched)
}
