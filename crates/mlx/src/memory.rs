// SPDX-License-Identifier: EUPL-1.2
//! MLX's allocator: memory in use, peak, cache, and limits.
//!
//! "Active" memory is held by live arrays; the "cache" keeps freed buffers
//! for reuse. All figures are bytes and cover the whole process.

use crate::error::Result;
use crate::ffi::{check, sys};

fn read(op: &'static str, f: unsafe extern "C" fn(*mut usize) -> i32) -> Result<usize> {
    let mut v = 0usize;
    // SAFETY: f writes one size_t.
    check(op, unsafe { f(&mut v) })?;
    Ok(v)
}

/// Bytes held by live arrays.
pub fn active_memory() -> Result<usize> {
    read("get_active_memory", sys::mlxs_get_active_memory)
}

/// The highest active memory since start or the last [`reset_peak_memory`].
pub fn peak_memory() -> Result<usize> {
    read("get_peak_memory", sys::mlxs_get_peak_memory)
}

/// Bytes kept in the buffer cache.
pub fn cache_memory() -> Result<usize> {
    read("get_cache_memory", sys::mlxs_get_cache_memory)
}

/// The memory limit MLX tries to stay under.
pub fn memory_limit() -> Result<usize> {
    read("get_memory_limit", sys::mlxs_get_memory_limit)
}

/// Restarts peak tracking from the current active memory.
pub fn reset_peak_memory() -> Result<()> {
    // SAFETY: plain call.
    check("reset_peak_memory", unsafe { sys::mlxs_reset_peak_memory() })
}

/// Releases the buffer cache to the system.
pub fn clear_cache() -> Result<()> {
    // SAFETY: plain call.
    check("clear_cache", unsafe { sys::mlxs_clear_cache() })
}

fn set(op: &'static str, f: unsafe extern "C" fn(usize, *mut usize) -> i32, limit: usize) -> Result<usize> {
    let mut prev = 0usize;
    // SAFETY: f writes one size_t.
    check(op, unsafe { f(limit, &mut prev) })?;
    Ok(prev)
}

/// Sets the memory limit; returns the previous one.
pub fn set_memory_limit(limit: usize) -> Result<usize> {
    set("set_memory_limit", sys::mlxs_set_memory_limit, limit)
}

/// Sets the cache limit (0 disables the cache); returns the previous one.
pub fn set_cache_limit(limit: usize) -> Result<usize> {
    set("set_cache_limit", sys::mlxs_set_cache_limit, limit)
}

/// Sets the wired (resident) limit on Metal; returns the previous one. Other
/// backends (CPU, CUDA) have no wired memory: they ignore the value and
/// report 0.
pub fn set_wired_limit(limit: usize) -> Result<usize> {
    set("set_wired_limit", sys::mlxs_set_wired_limit, limit)
}

/// A snapshot of the allocator's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by live arrays.
    pub active: usize,
    /// Peak active bytes.
    pub peak: usize,
    /// Bytes in the buffer cache.
    pub cache: usize,
}

/// Reads active, peak and cache memory together.
pub fn stats() -> Result<MemoryStats> {
    Ok(MemoryStats { active: active_memory()?, peak: peak_memory()?, cache: cache_memory()? })
}
