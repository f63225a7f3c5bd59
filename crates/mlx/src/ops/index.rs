// SPDX-License-Identifier: EUPL-1.2
//! Indexing: static, strided and dynamic slices and their updates, gathers
//! (`take`) and scatters (`put_along_axis`), and axis normalisation.

use crate::array::Array;
use crate::device::current_code as dev;
use crate::error::{Error, Result};
use crate::ffi::{array_out, sys};

fn check_bounds(op: &'static str, a: &Array, start: &[i32], stop: &[i32], strides: &[i32]) -> Result<()> {
    let n = a.ndim();
    if start.len() != n || stop.len() != n || strides.len() != n {
        return Err(Error::invalid(
            op,
            format!(
                "an array with {n} dimensions needs {n} starts, stops and strides (got {}, {}, {})",
                start.len(),
                stop.len(),
                strides.len()
            ),
        ));
    }
    if let Some(s) = strides.iter().find(|&&s| s == 0) {
        return Err(Error::invalid(op, format!("stride {s} must be non-zero")));
    }
    Ok(())
}

/// `a[start[0]:stop[0], start[1]:stop[1], ...]`; bounds are clamped like NumPy's.
pub fn slice(a: &Array, start: &[i32], stop: &[i32]) -> Result<Array> {
    let strides = vec![1; start.len()];
    slice_strided(a, start, stop, &strides)
}

/// `a[start:stop:stride, ...]` over every axis.
pub fn slice_strided(a: &Array, start: &[i32], stop: &[i32], strides: &[i32]) -> Result<Array> {
    check_bounds("slice", a, start, stop, strides)?;
    // SAFETY: the three lists share ndim as length.
    array_out("slice", |o| unsafe {
        sys::mlxs_slice(o, a.as_raw(), start.as_ptr(), stop.as_ptr(), strides.as_ptr(), start.len(), dev())
    })
}

/// `a[..., start:stop, ...]` along one axis (negative axis counts from the end).
pub fn slice_axis(a: &Array, axis: i32, start: i32, stop: i32) -> Result<Array> {
    let shape = a.shape();
    let ax = normalise_axis("slice_axis", axis, shape.len())?;
    let mut lo = vec![0; shape.len()];
    let mut hi = shape;
    lo[ax] = start;
    hi[ax] = stop;
    slice(a, &lo, &hi)
}

/// A slice whose start is an int array (it may be lazy) over `axes`, with
/// fixed `sizes` for every axis. A negative start counts from the end, and a
/// start that would run the window past the array is clamped (MLX itself
/// does not check, so the shim does).
pub fn slice_dynamic(a: &Array, start: &Array, axes: &[i32], sizes: &[i32]) -> Result<Array> {
    // SAFETY: lists valid for their lengths.
    array_out("slice_dynamic", |o| unsafe {
        sys::mlxs_slice_dynamic(
            o,
            a.as_raw(),
            start.as_raw(),
            axes.as_ptr(),
            axes.len(),
            sizes.as_ptr(),
            sizes.len(),
            dev(),
        )
    })
}

/// `src` with `src[start:stop] = update`.
pub fn slice_update(src: &Array, update: &Array, start: &[i32], stop: &[i32]) -> Result<Array> {
    let strides = vec![1; start.len()];
    slice_update_strided(src, update, start, stop, &strides)
}

/// `src` with `src[start:stop:strides] = update`.
pub fn slice_update_strided(
    src: &Array,
    update: &Array,
    start: &[i32],
    stop: &[i32],
    strides: &[i32],
) -> Result<Array> {
    check_bounds("slice_update", src, start, stop, strides)?;
    // SAFETY: the three lists share ndim as length.
    array_out("slice_update", |o| unsafe {
        sys::mlxs_slice_update(
            o,
            src.as_raw(),
            update.as_raw(),
            start.as_ptr(),
            stop.as_ptr(),
            strides.as_ptr(),
            start.len(),
            dev(),
        )
    })
}

/// `src` with `update` written at an int-array `start` over `axes`. Starts are
/// clamped like those of [`slice_dynamic`], so the write stays inside `src`.
pub fn slice_update_dynamic(src: &Array, update: &Array, start: &Array, axes: &[i32]) -> Result<Array> {
    // SAFETY: axes valid for its length.
    array_out("slice_update_dynamic", |o| unsafe {
        sys::mlxs_slice_update_dynamic(
            o,
            src.as_raw(),
            update.as_raw(),
            start.as_raw(),
            axes.as_ptr(),
            axes.len(),
            dev(),
        )
    })
}

/// Elements of `a` at integer `indices` along `axis`.
///
/// A negative index counts from the end; an index still outside the axis is
/// clamped to the nearest valid one (MLX does not bounds-check gathers, so
/// the shim clamps rather than read outside the array).
pub fn take(a: &Array, indices: &Array, axis: i32) -> Result<Array> {
    // SAFETY: live handles.
    array_out("take", |o| unsafe { sys::mlxs_take(o, a.as_raw(), indices.as_raw(), axis, true, dev()) })
}

/// Elements of the flattened `a` at integer `indices` (clamped as in [`take`]).
pub fn take_flat(a: &Array, indices: &Array) -> Result<Array> {
    // SAFETY: live handles.
    array_out("take", |o| unsafe { sys::mlxs_take(o, a.as_raw(), indices.as_raw(), 0, false, dev()) })
}

/// `a` gathered along `axis` with per-position integer `indices` (clamped as
/// in [`take`]).
pub fn take_along_axis(a: &Array, indices: &Array, axis: i32) -> Result<Array> {
    // SAFETY: live handles.
    array_out("take_along_axis", |o| unsafe { sys::mlxs_take_along_axis(o, a.as_raw(), indices.as_raw(), axis, dev()) })
}

/// `a` with `values` scattered along `axis` at per-position integer `indices`
/// (clamped as in [`take`], so a bad index never writes outside `a`).
pub fn put_along_axis(a: &Array, indices: &Array, values: &Array, axis: i32) -> Result<Array> {
    // SAFETY: live handles.
    array_out("put_along_axis", |o| unsafe {
        sys::mlxs_put_along_axis(o, a.as_raw(), indices.as_raw(), values.as_raw(), axis, dev())
    })
}

/// Resolves a possibly negative axis against `ndim`.
pub fn normalise_axis(op: &'static str, axis: i32, ndim: usize) -> Result<usize> {
    let n = ndim as i64;
    let i = if axis < 0 { n + i64::from(axis) } else { i64::from(axis) };
    if i < 0 || i >= n {
        return Err(Error::invalid(op, format!("axis {axis} is out of range for an array with {ndim} dimensions")));
    }
    Ok(i as usize)
}
