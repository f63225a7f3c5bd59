// SPDX-License-Identifier: EUPL-1.2
//! MLX's own distributed layer: communication groups and collective ops.
//!
//! No transport of our own: a [`Group`] is MLX's `distributed::Group` over one
//! of its backends ([`Backend`]: ring over TCP, MPI, NCCL on CUDA, JACCL over
//! Thunderbolt), and [`all_sum`], [`all_gather`], [`send`], [`recv`] are MLX's
//! ops. Like every op they are lazy: nothing moves until the result is
//! evaluated, and every rank must evaluate the same collectives in the same
//! order.
//!
//! Initialisation reads the environment a launcher sets (see
//! `docs/distributed.md` and [`launch`]): `MLX_RANK` and `MLX_HOSTFILE` for
//! the ring, `MLX_RANK`, `MLX_WORLD_SIZE`, `NCCL_HOST_IP` and `NCCL_PORT` for
//! NCCL. MLX's ring backend waits in `accept` for a missing peer without a
//! deadline, so [`init`] runs MLX's initialisation on a helper thread and
//! gives up after [`InitOptions::timeout`] with an error that says which rank
//! was waiting. The helper thread stays blocked until the process ends (a
//! socket `accept` cannot be cancelled); a later [`init`] in the same process
//! reports that instead of blocking too.
//!
//! Thread safety: MLX keeps one group per backend per process and its ring
//! group shares buffers between collectives, so two threads issuing
//! collectives on the same group would race. A [`Group`] is therefore neither
//! `Send` nor `Sync` (like [`Array`]: it belongs to the thread that made it,
//! whose streams evaluate its collectives), and only one handle to a
//! multi-process world group may exist at a time in a process: a second
//! [`init`] while one is held is an error.

pub mod launch;
pub mod signals;

pub use launch::{Role, launch_or_join};

use std::ffi::CString;
use std::fmt;
use std::marker::PhantomData;
use std::os::raw::c_int;
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::array::{Array, Dtype};
use crate::device::current_code as dev;
use crate::error::{Error, Result};
use crate::ffi::{array_out, check, sys};

/// A communication backend of MLX's distributed layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// The first that initialises: NCCL (on CUDA), ring, MPI, JACCL.
    #[default]
    Any,
    /// TCP sockets in a ring (`MLX_RANK`, `MLX_HOSTFILE`); works on every device.
    Ring,
    /// MPI (`libmpi` loaded at run time; `MLX_MPI_LIBNAME` overrides its name).
    Mpi,
    /// NCCL on CUDA (`MLX_RANK`, `MLX_WORLD_SIZE`, `NCCL_HOST_IP`, `NCCL_PORT`).
    Nccl,
    /// RDMA over Thunderbolt on macOS.
    Jaccl,
}

impl Backend {
    /// Every backend, in the order of their names.
    pub const ALL: [Backend; 5] = [Backend::Any, Backend::Ring, Backend::Mpi, Backend::Nccl, Backend::Jaccl];

    /// MLX's name of the backend.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Any => "any",
            Backend::Ring => "ring",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
            Backend::Jaccl => "jaccl",
        }
    }

    fn c_name(self) -> CString {
        CString::new(self.name()).unwrap_or_default()
    }
}

crate::display_by_name!(Backend);

impl FromStr for Backend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| {
            Error::invalid(
                "distributed_backend",
                format!("unknown backend {s:?}; expected one of any, ring, mpi, nccl, jaccl"),
            )
        })
    }
}

/// Whether MLX was built with `backend` (not whether a job is configured).
pub fn is_available(backend: Backend) -> Result<bool> {
    let name = backend.c_name();
    let mut out = false;
    // SAFETY: name is NUL-terminated; out is a valid bool.
    check("distributed_is_available", unsafe { sys::mlxs_distributed_is_available(name.as_ptr(), &mut out) })?;
    Ok(out)
}

/// How to initialise a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// The backend.
    pub backend: Backend,
    /// Fail when the backend cannot be initialised (no launcher environment);
    /// otherwise a missing environment gives a group of size 1.
    pub strict: bool,
    /// How long to wait for every rank to join.
    pub timeout: Duration,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions { backend: Backend::Any, strict: false, timeout: DEFAULT_INIT_TIMEOUT }
    }
}

impl InitOptions {
    /// Strict initialisation of `backend` with the default timeout.
    pub fn strict(backend: Backend) -> InitOptions {
        InitOptions { backend, strict: true, timeout: DEFAULT_INIT_TIMEOUT }
    }

    /// The same options with another timeout.
    pub fn timeout(mut self, timeout: Duration) -> InitOptions {
        self.timeout = timeout;
        self
    }
}

/// The default deadline for every rank to join: MLX's ring backend retries a
/// connection for about 31 s (five attempts with doubling waits from 1 s).
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A world group of more than one process is held by a live [`Group`].
static WORLD_HELD: AtomicBool = AtomicBool::new(false);
/// Initialisations that timed out while their helper thread is still blocked.
static ABANDONED: AtomicI64 = AtomicI64::new(0);
const RUNNING: u8 = 0;
const DONE: u8 = 1;
const ABANDONED_STATE: u8 = 2;

struct RawGroup(NonNull<sys::mlxs_group_s>);

// SAFETY: the handle only moves from the helper thread that made it to the
// thread that waits for it; MLX's group object has no thread affinity.
unsafe impl Send for RawGroup {}

impl Drop for RawGroup {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it once.
        unsafe { sys::mlxs_group_free(self.0.as_ptr()) }
    }
}

/// A group of processes that communicate: MLX's `distributed::Group`.
pub struct Group {
    raw: RawGroup,
    rank: i32,
    size: i32,
    backend: Backend,
    holds_world: bool,
    _not_send: PhantomData<*const ()>,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

/// Initialises `opts.backend` and returns the group of every process of the
/// job (size 1 when not strict and no launcher environment is set).
///
/// # Errors
/// The backend failed to initialise (MLX's message, naming what is missing),
/// not every rank joined within `opts.timeout`, an earlier initialisation is
/// still stuck waiting for peers, or a world group is already held.
pub fn init(opts: &InitOptions) -> Result<Group> {
    const OP: &str = "distributed_init";
    if ABANDONED.load(Ordering::SeqCst) > 0 {
        return Err(Error::Mlx {
            op: OP,
            message: "an earlier initialisation timed out and is still waiting for its peers (start a new process \
                      to try again)"
                .into(),
        });
    }
    let backend = opts.backend;
    let name = backend.c_name();
    let (tx, rx) = mpsc::channel::<Result<RawGroup>>();
    // RUNNING → DONE by the helper, RUNNING → ABANDONED by this thread on a
    // timeout: whichever comes first decides who accounts for a stuck helper.
    let state = Arc::new(AtomicU8::new(RUNNING));
    let helper_state = Arc::clone(&state);
    let strict = opts.strict;
    let spawned = std::thread::Builder::new().name("mlx-distributed-init".into()).spawn(move || {
        let mut raw: sys::mlxs_group = std::ptr::null_mut();
        // SAFETY: name is NUL-terminated; the shim writes an owned handle.
        let status = unsafe { sys::mlxs_distributed_init(&mut raw, strict, name.as_ptr()) };
        let result = check(OP, status).and_then(|()| {
            NonNull::new(raw)
                .map(RawGroup)
                .ok_or(Error::Mlx { op: OP, message: "the shim returned a null group".into() })
        });
        if helper_state.swap(DONE, Ordering::SeqCst) == ABANDONED_STATE {
            ABANDONED.fetch_sub(1, Ordering::SeqCst);
        }
        // After a timeout nobody waits: the group is dropped here.
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        return Err(Error::Mlx { op: OP, message: format!("cannot start the initialisation thread: {e}") });
    }
    let raw = match rx.recv_timeout(opts.timeout) {
        Ok(r) => r?,
        Err(mpsc::RecvTimeoutError::Timeout)
            if state.compare_exchange(RUNNING, ABANDONED_STATE, Ordering::SeqCst, Ordering::SeqCst).is_ok() =>
        {
            ABANDONED.fetch_add(1, Ordering::SeqCst);
            let rank = std::env::var("MLX_RANK").unwrap_or_else(|_| "?".into());
            return Err(Error::Mlx {
                op: OP,
                message: format!(
                    "rank {rank}: not every rank joined the {backend} group within {:.1} s (is every rank started, \
                     with the same hostfile?)",
                    opts.timeout.as_secs_f64()
                ),
            });
        }
        // The helper finished just as the deadline passed: its result is sent.
        Err(mpsc::RecvTimeoutError::Timeout) => rx
            .recv()
            .map_err(|_| Error::Mlx { op: OP, message: "the initialisation thread ended without a result".into() })??,
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            return Err(Error::Mlx { op: OP, message: "the initialisation thread ended without a result".into() });
        }
    };
    let (rank, size) =
        (group_int(&raw, "group_rank", sys::mlxs_group_rank)?, group_int(&raw, "group_size", sys::mlxs_group_size)?);
    let holds_world = size > 1;
    if holds_world && WORLD_HELD.swap(true, Ordering::SeqCst) {
        return Err(Error::Mlx {
            op: OP,
            message: format!(
                "a {size}-process group is already held in this process; MLX keeps one group per backend, so drop \
                 the other handle first"
            ),
        });
    }
    Ok(Group { raw, rank, size, backend, holds_world, _not_send: PhantomData })
}

type IntGetter = unsafe extern "C" fn(sys::mlxs_group, *mut c_int) -> c_int;

fn group_int(raw: &RawGroup, op: &'static str, f: IntGetter) -> Result<i32> {
    let mut out: c_int = 0;
    // SAFETY: live handle; out is a valid int.
    check(op, unsafe { f(raw.0.as_ptr(), &mut out) })?;
    Ok(out)
}

impl Group {
    /// This process's rank in the group, `0..size`.
    pub fn rank(&self) -> i32 {
        self.rank
    }

    /// The number of processes in the group.
    pub fn size(&self) -> i32 {
        self.size
    }

    /// The backend the group was initialised with.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Splits the group: processes passing the same `color` form a new group,
    /// ordered by `key` (a negative key keeps this group's order). MLX's ring
    /// backend cannot split and says so.
    pub fn split(&self, color: i32, key: i32) -> Result<Group> {
        const OP: &str = "group_split";
        let mut raw: sys::mlxs_group = std::ptr::null_mut();
        // SAFETY: live handle; the shim writes an owned handle.
        check(OP, unsafe { sys::mlxs_group_split(&mut raw, self.as_raw(), color, key) })?;
        let raw = NonNull::new(raw)
            .map(RawGroup)
            .ok_or(Error::Mlx { op: OP, message: "the shim returned a null group".into() })?;
        let rank = group_int(&raw, "group_rank", sys::mlxs_group_rank)?;
        let size = group_int(&raw, "group_size", sys::mlxs_group_size)?;
        Ok(Group { raw, rank, size, backend: self.backend, holds_world: false, _not_send: PhantomData })
    }

    fn as_raw(&self) -> sys::mlxs_group {
        self.raw.0.as_ptr()
    }

    fn check_peer(&self, op: &'static str, peer: i32) -> Result<()> {
        if peer < 0 || peer >= self.size || peer == self.rank {
            return Err(Error::invalid(
                op,
                format!("peer rank {peer} is not another rank of this group (rank {} of {})", self.rank, self.size),
            ));
        }
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.holds_world {
            WORLD_HELD.store(false, Ordering::SeqCst);
        }
    }
}

/// The element-wise sum of `x` over every rank of `group` (every rank gets it).
pub fn all_sum(x: &Array, group: &Group) -> Result<Array> {
    // SAFETY: live handles.
    array_out("all_sum", |o| unsafe { sys::mlxs_all_sum(o, x.as_raw(), group.as_raw(), dev()) })
}

/// The element-wise maximum of `x` over every rank of `group`.
pub fn all_max(x: &Array, group: &Group) -> Result<Array> {
    // SAFETY: live handles.
    array_out("all_max", |o| unsafe { sys::mlxs_all_max(o, x.as_raw(), group.as_raw(), dev()) })
}

/// The element-wise minimum of `x` over every rank of `group`.
pub fn all_min(x: &Array, group: &Group) -> Result<Array> {
    // SAFETY: live handles.
    array_out("all_min", |o| unsafe { sys::mlxs_all_min(o, x.as_raw(), group.as_raw(), dev()) })
}

/// Every rank's `x` concatenated along the first axis, in rank order.
pub fn all_gather(x: &Array, group: &Group) -> Result<Array> {
    // SAFETY: live handles.
    array_out("all_gather", |o| unsafe { sys::mlxs_all_gather(o, x.as_raw(), group.as_raw(), dev()) })
}

/// Sends `x` to rank `dst`. The send happens when the returned array is
/// evaluated; rank `dst` must evaluate a matching [`recv`].
pub fn send(x: &Array, dst: i32, group: &Group) -> Result<Array> {
    group.check_peer("send", dst)?;
    // SAFETY: live handles.
    array_out("send", |o| unsafe { sys::mlxs_send(o, x.as_raw(), dst, group.as_raw(), dev()) })
}

/// Receives an array of `shape` and `dtype` from rank `src`.
pub fn recv(shape: &[i32], dtype: Dtype, src: i32, group: &Group) -> Result<Array> {
    group.check_peer("recv", src)?;
    // SAFETY: live handle; shape valid for its length.
    array_out("recv", |o| unsafe {
        sys::mlxs_recv(o, shape.as_ptr(), shape.len(), dtype.code(), src, group.as_raw(), dev())
    })
}

/// Receives an array shaped and typed like `like` from rank `src`.
pub fn recv_like(like: &Array, src: i32, group: &Group) -> Result<Array> {
    group.check_peer("recv_like", src)?;
    // SAFETY: live handles.
    array_out("recv_like", |o| unsafe { sys::mlxs_recv_like(o, like.as_raw(), src, group.as_raw(), dev()) })
}

/// Rank `root`'s `x` on every rank: an [`all_sum`] to which only `root`
/// contributes (the other ranks pass any array of the same shape and dtype).
/// Exact for integers; for floats a `-0.0` arrives as `0.0`.
pub fn broadcast(x: &Array, root: i32, group: &Group) -> Result<Array> {
    if root < 0 || root >= group.size() {
        return Err(Error::invalid("broadcast", format!("root {root} is not a rank of a group of {}", group.size())));
    }
    if x.dtype() == Dtype::Bool {
        return Err(Error::invalid("broadcast", "bool arrays cannot be summed; cast them to uint8"));
    }
    if group.rank() == root { all_sum(x, group) } else { all_sum(&crate::ops::zeros_like(x)?, group) }
}

/// Rank `root`'s bytes on every rank (`data` is read on `root` only): how
/// rank 0 can pass a request to the other ranks of a tensor-parallel job.
/// Two collectives: the length, then the bytes.
pub fn broadcast_bytes(data: &[u8], root: i32, group: &Group) -> Result<Vec<u8>> {
    const OP: &str = "broadcast_bytes";
    let mine = group.rank() == root;
    let len = if mine {
        i32::try_from(data.len()).map_err(|_| Error::invalid(OP, format!("{} bytes is too many", data.len())))?
    } else {
        0
    };
    let n = broadcast(&Array::from_slice(&[len], &[1])?, root, group)?.to_vec::<i32>()?;
    let n = n
        .first()
        .copied()
        .filter(|&n| n >= 0)
        .ok_or_else(|| Error::Mlx { op: OP, message: "the broadcast length is not a length".into() })?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let payload = if mine { Array::from_slice(data, &[n])? } else { crate::ops::zeros(&[n], Dtype::Uint8)? };
    broadcast(&payload, root, group)?.to_vec::<u8>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_round_trip() {
        for b in Backend::ALL {
            assert_eq!(b.name().parse::<Backend>().ok(), Some(b));
        }
        assert!("tcp".parse::<Backend>().is_err());
    }
}
