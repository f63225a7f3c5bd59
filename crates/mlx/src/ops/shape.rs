// SPDX-License-Identifier: EUPL-1.2
//! Ops that rearrange elements without computing on them: reshapes,
//! transposes, broadcasts, joins and splits, repeats, padding and strided
//! views.

use crate::array::Array;
use crate::device::current_code as dev;
use crate::error::{Error, Result};
use crate::ffi::{self, array_out, sys, vec_out};

/// The same elements in a new shape; one dimension may be -1 (inferred).
pub fn reshape(a: &Array, shape: &[i32]) -> Result<Array> {
    // SAFETY: shape valid for its length.
    array_out("reshape", |o| unsafe { sys::mlxs_reshape(o, a.as_raw(), shape.as_ptr(), shape.len(), dev()) })
}

/// Permutes the axes; `axes` must name each axis once.
pub fn transpose(a: &Array, axes: &[i32]) -> Result<Array> {
    if axes.is_empty() && a.ndim() > 0 {
        return Err(Error::invalid("transpose", "axes must list every axis; use transpose_all to reverse them"));
    }
    // SAFETY: axes valid for its length.
    array_out("transpose", |o| unsafe { sys::mlxs_transpose(o, a.as_raw(), axes.as_ptr(), axes.len(), dev()) })
}

/// Reverses the axes.
pub fn transpose_all(a: &Array) -> Result<Array> {
    // SAFETY: live handle; zero axes means reverse.
    array_out("transpose", |o| unsafe { sys::mlxs_transpose(o, a.as_raw(), std::ptr::null(), 0, dev()) })
}

/// Inserts axes of size one at `axes` (positions in the result).
pub fn expand_dims(a: &Array, axes: &[i32]) -> Result<Array> {
    // SAFETY: axes valid for its length.
    array_out("expand_dims", |o| unsafe { sys::mlxs_expand_dims(o, a.as_raw(), axes.as_ptr(), axes.len(), dev()) })
}

/// Removes the given axes of size one; an empty list removes all of them.
pub fn squeeze(a: &Array, axes: &[i32]) -> Result<Array> {
    // SAFETY: axes valid for its length.
    array_out("squeeze", |o| unsafe { sys::mlxs_squeeze(o, a.as_raw(), axes.as_ptr(), axes.len(), dev()) })
}

/// Broadcasts to `shape` (a view, no copy).
pub fn broadcast_to(a: &Array, shape: &[i32]) -> Result<Array> {
    // SAFETY: shape valid for its length.
    array_out("broadcast_to", |o| unsafe { sys::mlxs_broadcast_to(o, a.as_raw(), shape.as_ptr(), shape.len(), dev()) })
}

/// Joins arrays along an existing axis.
pub fn concatenate(arrays: &[&Array], axis: i32) -> Result<Array> {
    if arrays.is_empty() {
        return Err(Error::invalid("concatenate", "no arrays to concatenate"));
    }
    let hs = ffi::handles(arrays);
    // SAFETY: hs holds live handles.
    array_out("concatenate", |o| unsafe { sys::mlxs_concatenate(o, hs.as_ptr(), hs.len(), axis, dev()) })
}

/// Joins arrays of one shape along a new axis.
pub fn stack(arrays: &[&Array], axis: i32) -> Result<Array> {
    if arrays.is_empty() {
        return Err(Error::invalid("stack", "no arrays to stack"));
    }
    let hs = ffi::handles(arrays);
    // SAFETY: hs holds live handles.
    array_out("stack", |o| unsafe { sys::mlxs_stack(o, hs.as_ptr(), hs.len(), axis, dev()) })
}

/// Splits into `sections` equal parts along `axis`.
pub fn split(a: &Array, sections: i32, axis: i32) -> Result<Vec<Array>> {
    // SAFETY: live handle; the shim writes an owned vector.
    vec_out("split", |o| unsafe { sys::mlxs_split_sections(o, a.as_raw(), sections, axis, dev()) })
}

/// Splits along `axis` before each of `indices`.
pub fn split_at(a: &Array, indices: &[i32], axis: i32) -> Result<Vec<Array>> {
    // SAFETY: indices valid for its length.
    vec_out("split", |o| unsafe {
        sys::mlxs_split_indices(o, a.as_raw(), indices.as_ptr(), indices.len(), axis, dev())
    })
}

/// Merges axes `start..=end` into one.
pub fn flatten(a: &Array, start: i32, end: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("flatten", |o| unsafe { sys::mlxs_flatten(o, a.as_raw(), start, end, dev()) })
}

/// Swaps two axes.
pub fn swapaxes(a: &Array, axis1: i32, axis2: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("swapaxes", |o| unsafe { sys::mlxs_swapaxes(o, a.as_raw(), axis1, axis2, dev()) })
}

/// Repeats each element `repeats` times along `axis`.
pub fn repeat(a: &Array, repeats: i32, axis: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("repeat", |o| unsafe { sys::mlxs_repeat(o, a.as_raw(), repeats, axis, dev()) })
}

/// Pads `axes[i]` with `low[i]` values before and `high[i]` after, filled with `value`.
pub fn pad(a: &Array, axes: &[i32], low: &[i32], high: &[i32], value: &Array) -> Result<Array> {
    if axes.len() != low.len() || axes.len() != high.len() {
        return Err(Error::invalid(
            "pad",
            format!("{} axes need as many low ({}) and high ({}) sizes", axes.len(), low.len(), high.len()),
        ));
    }
    // SAFETY: the three lists share one length.
    array_out("pad", |o| unsafe {
        sys::mlxs_pad(o, a.as_raw(), axes.as_ptr(), low.as_ptr(), high.as_ptr(), axes.len(), value.as_raw(), dev())
    })
}

/// A view of `a`'s elements with the given shape, strides (in elements) and
/// offset. The view must stay inside `a`'s elements, or this fails.
pub fn as_strided(a: &Array, shape: &[i32], strides: &[i64], offset: usize) -> Result<Array> {
    if shape.len() != strides.len() {
        return Err(Error::invalid("as_strided", format!("shape {shape:?} and strides {strides:?} differ in length")));
    }
    // SAFETY: shape and strides share one length.
    array_out("as_strided", |o| unsafe {
        sys::mlxs_as_strided(o, a.as_raw(), shape.as_ptr(), strides.as_ptr(), shape.len(), offset, dev())
    })
}

/// Number of elements implied by a shape, for callers building buffers.
pub fn shape_size(op: &'static str, shape: &[i32]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d).map_err(|_| Error::invalid(op, format!("negative dimension in shape {shape:?}")))?;
        acc.checked_mul(d).ok_or_else(|| Error::invalid(op, format!("shape {shape:?} is too large")))
    })
}
