// SPDX-License-Identifier: EUPL-1.2
//! Arrays made from nothing but a shape: zeros, ones, filled, ranges and
//! identity or triangular matrices.

use crate::array::{Array, Dtype};
use crate::device::current_code as dev;
use crate::error::Result;
use crate::ffi::{array_out, sys};

/// An array of zeros.
pub fn zeros(shape: &[i32], dtype: Dtype) -> Result<Array> {
    // SAFETY: shape is valid for its length.
    array_out("zeros", |o| unsafe { sys::mlxs_zeros(o, shape.as_ptr(), shape.len(), dtype.code(), dev()) })
}

/// An array of ones.
pub fn ones(shape: &[i32], dtype: Dtype) -> Result<Array> {
    // SAFETY: shape is valid for its length.
    array_out("ones", |o| unsafe { sys::mlxs_ones(o, shape.as_ptr(), shape.len(), dtype.code(), dev()) })
}

/// An array of `shape` filled with `value` (broadcast), converted to `dtype`.
pub fn full(shape: &[i32], value: &Array, dtype: Dtype) -> Result<Array> {
    // SAFETY: live handles; shape valid for its length.
    array_out("full", |o| unsafe {
        sys::mlxs_full(o, shape.as_ptr(), shape.len(), value.as_raw(), dtype.code(), dev())
    })
}

/// Evenly spaced values in `[start, stop)`.
pub fn arange(start: f64, stop: f64, step: f64, dtype: Dtype) -> Result<Array> {
    // SAFETY: plain values.
    array_out("arange", |o| unsafe { sys::mlxs_arange(o, start, stop, step, dtype.code(), dev()) })
}

/// An `n × m` matrix with ones on diagonal `k`.
pub fn eye(n: i32, m: i32, k: i32, dtype: Dtype) -> Result<Array> {
    // SAFETY: plain values.
    array_out("eye", |o| unsafe { sys::mlxs_eye(o, n, m, k, dtype.code(), dev()) })
}

/// An `n × m` matrix with ones at and below diagonal `k`.
pub fn tri(n: i32, m: i32, k: i32, dtype: Dtype) -> Result<Array> {
    // SAFETY: plain values.
    array_out("tri", |o| unsafe { sys::mlxs_tri(o, n, m, k, dtype.code(), dev()) })
}
