// SPDX-License-Identifier: EUPL-1.2
//! The funnel between `mlx-sys` (the raw declarations of the C shim) and the
//! safe layer: the one function that turns a shim status into a [`Result`],
//! and helpers that wrap out-pointers into owned types.
//!
//! Every `unsafe` block of the workspace lives in this crate (this module, the
//! RAII wrappers that own shim handles: [`crate::Array`], [`VecHandle`], the
//! closure types of [`crate::transforms`], and the safe functions over them)
//! or in `mlx-sys`; a test in `xtask` checks it.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
use std::ptr::NonNull;

use crate::array::Array;
use crate::error::{Error, Result};

pub(crate) use mlx_sys as sys;

thread_local! {
    /// A panic caught inside a callback, resumed once the C call returns.
    static PANIC: RefCell<Option<Box<dyn Any + Send>>> = const { RefCell::new(None) };
    /// An error returned by a callback, reported by the enclosing call.
    static CALLBACK_ERROR: RefCell<Option<Error>> = const { RefCell::new(None) };
}

pub(crate) fn stash_panic(p: Box<dyn Any + Send>) {
    PANIC.with(|slot| *slot.borrow_mut() = Some(p));
}

pub(crate) fn stash_callback_error(e: Error) {
    CALLBACK_ERROR.with(|slot| *slot.borrow_mut() = Some(e));
}

/// Reads and clears the shim's per-thread message.
fn take_message() -> String {
    // SAFETY: mlxs_last_error returns a pointer to a thread-local std::string
    // that lives until the next shim call on this thread; we copy it at once.
    let msg = unsafe {
        let p = sys::mlxs_last_error();
        if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
    };
    // SAFETY: no arguments; clears a thread-local string.
    unsafe { sys::mlxs_clear_error() };
    msg
}

/// The funnel: turns the status of a shim call named `op` into a Result.
///
/// A panic raised by a Rust callback during the call is resumed here, after
/// the C++ frames have unwound through their own exception handling.
pub(crate) fn check(op: &'static str, status: c_int) -> Result<()> {
    if let Some(p) = PANIC.with(|slot| slot.borrow_mut().take()) {
        // Discard the C++ message ("callback failed") and re-raise the panic.
        let _ = take_message();
        std::panic::resume_unwind(p);
    }
    if status == 0 {
        return Ok(());
    }
    let message = take_message();
    if let Some(e) = CALLBACK_ERROR.with(|slot| slot.borrow_mut().take()) {
        return Err(Error::Callback { op, source: Box::new(e) });
    }
    Err(Error::Mlx { op, message: if message.is_empty() { format!("failed with status {status}") } else { message } })
}

/// Calls a shim function that produces one array through an out pointer.
pub(crate) fn array_out(op: &'static str, f: impl FnOnce(*mut sys::mlxs_array) -> c_int) -> Result<Array> {
    let mut out: sys::mlxs_array = std::ptr::null_mut();
    let status = f(&mut out);
    check(op, status)?;
    let raw = NonNull::new(out).ok_or(Error::Mlx { op, message: "the shim returned a null array".into() })?;
    // SAFETY: on success the shim hands over one owned array handle.
    Ok(unsafe { Array::from_raw(raw) })
}

/// Calls a shim function that produces a C string (malloc'ed by the shim, freed here).
pub(crate) fn string_out(op: &'static str, f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<String> {
    let mut out: *mut c_char = std::ptr::null_mut();
    check(op, f(&mut out))?;
    if out.is_null() {
        return Err(Error::Mlx { op, message: "the shim returned a null string".into() });
    }
    // SAFETY: on success the shim hands over a NUL-terminated string, valid until freed below.
    let text = unsafe { CStr::from_ptr(out).to_string_lossy().into_owned() };
    // SAFETY: allocated by the shim with strdup, freed once.
    unsafe { sys::mlxs_string_free(out) };
    Ok(text)
}

/// Calls a shim function that produces a vector of arrays.
pub(crate) fn vec_out(op: &'static str, f: impl FnOnce(*mut sys::mlxs_vec) -> c_int) -> Result<Vec<Array>> {
    let mut out: sys::mlxs_vec = std::ptr::null_mut();
    let status = f(&mut out);
    check(op, status)?;
    VecHandle::from_raw(op, out)?.to_arrays(op)
}

/// Owns an `mlxs_vec`.
pub(crate) struct VecHandle(NonNull<sys::mlxs_vec_s>);

impl VecHandle {
    pub(crate) fn from_raw(op: &'static str, raw: sys::mlxs_vec) -> Result<Self> {
        NonNull::new(raw).map(VecHandle).ok_or(Error::Mlx { op, message: "the shim returned a null vector".into() })
    }

    pub(crate) fn as_ptr(&self) -> sys::mlxs_vec {
        self.0.as_ptr()
    }

    pub(crate) fn to_arrays(&self, op: &'static str) -> Result<Vec<Array>> {
        // SAFETY: the handle is live for &self.
        let n = unsafe { sys::mlxs_vec_len(self.as_ptr()) };
        (0..n)
            .map(|i| {
                // SAFETY: i < len; the shim writes a new owned handle.
                array_out(op, |out| unsafe { sys::mlxs_vec_get(out, self.as_ptr(), i) })
            })
            .collect()
    }
}

impl Drop for VecHandle {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it once.
        unsafe { sys::mlxs_vec_free(self.0.as_ptr()) }
    }
}

/// Raw handles of a slice of arrays, for shim calls that take `const mlxs_array*`.
pub(crate) fn handles(arrays: &[&Array]) -> Vec<sys::mlxs_array> {
    arrays.iter().map(|a| a.as_raw()).collect()
}

/// A raw handle or NULL.
pub(crate) fn opt_handle(a: Option<&Array>) -> sys::mlxs_array {
    a.map_or(std::ptr::null_mut(), Array::as_raw)
}

/// Converts a usize to the C int MLX uses for sizes and axes.
pub(crate) fn to_c_int(op: &'static str, what: &str, v: usize) -> Result<c_int> {
    c_int::try_from(v)
        .map_err(|_| Error::InvalidArgument { op, message: format!("{what} {v} does not fit in a 32-bit int") })
}
