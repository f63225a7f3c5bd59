// SPDX-License-Identifier: EUPL-1.2
//! Random numbers with explicit keys.
//!
//! A key is a `uint32` array of shape `[2]` made by [`key`]; the same key
//! always gives the same numbers, on every device. Functions take
//! `Option<&Array>`: `None` draws from MLX's global key sequence (seeded with
//! [`seed`]).

use crate::array::{Array, Dtype};
use crate::device::current_code as dev;
use crate::error::Result;
use crate::ffi::{array_out, check, opt_handle, sys};

/// A key made from `seed`.
pub fn key(seed: u64) -> Result<Array> {
    // SAFETY: plain value.
    array_out("random_key", |o| unsafe { sys::mlxs_random_key(o, seed) })
}

/// Seeds MLX's global key sequence.
pub fn seed(seed: u64) -> Result<()> {
    // SAFETY: plain value.
    check("random_seed", unsafe { sys::mlxs_random_seed(seed) })
}

/// Splits a key into `num` new keys, shape `[num, 2]`.
pub fn split(key: &Array, num: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("random_split", |o| unsafe { sys::mlxs_random_split(o, key.as_raw(), num, dev()) })
}

/// Normal samples with mean `loc` and standard deviation `scale`.
pub fn normal(shape: &[i32], dtype: Dtype, loc: f32, scale: f32, key: Option<&Array>) -> Result<Array> {
    // SAFETY: shape valid for its length; live or null key.
    array_out("random_normal", |o| unsafe {
        sys::mlxs_random_normal(o, shape.as_ptr(), shape.len(), dtype.code(), loc, scale, opt_handle(key), dev())
    })
}

/// Uniform samples in `[low, high)`.
pub fn uniform(low: &Array, high: &Array, shape: &[i32], dtype: Dtype, key: Option<&Array>) -> Result<Array> {
    in_range("random_uniform", sys::mlxs_random_uniform, low, high, shape, dtype, key)
}

/// Samples category indices from unnormalised log-probabilities along `axis`.
pub fn categorical(logits: &Array, axis: i32, key: Option<&Array>) -> Result<Array> {
    // SAFETY: live or null handles.
    array_out("random_categorical", |o| unsafe {
        sys::mlxs_random_categorical(o, logits.as_raw(), axis, opt_handle(key), dev())
    })
}

/// Booleans that are true with probability `p`.
pub fn bernoulli(p: &Array, shape: &[i32], key: Option<&Array>) -> Result<Array> {
    // SAFETY: shape valid for its length; live or null handles.
    array_out("random_bernoulli", |o| unsafe {
        sys::mlxs_random_bernoulli(o, p.as_raw(), shape.as_ptr(), shape.len(), opt_handle(key), dev())
    })
}

/// Integers in `[low, high)`.
pub fn randint(low: &Array, high: &Array, shape: &[i32], dtype: Dtype, key: Option<&Array>) -> Result<Array> {
    in_range("random_randint", sys::mlxs_random_randint, low, high, shape, dtype, key)
}

/// The shim's samplers between `low` and `high` (uniform, randint): out, low, high, shape, its
/// length, dtype, key, device.
type RangeSampler = unsafe extern "C" fn(
    *mut sys::mlxs_array,
    sys::mlxs_array,
    sys::mlxs_array,
    *const i32,
    usize,
    i32,
    sys::mlxs_array,
    i32,
) -> i32;

/// Samples of `shape` between `low` and `high` by `sample`, reported as `op` on failure.
fn in_range(
    op: &'static str,
    sample: RangeSampler,
    low: &Array,
    high: &Array,
    shape: &[i32],
    dtype: Dtype,
    key: Option<&Array>,
) -> Result<Array> {
    // SAFETY: `sample` is one of the shim's range samplers; shape valid for its length; live or
    // null handles.
    array_out(op, |o| unsafe {
        sample(o, low.as_raw(), high.as_raw(), shape.as_ptr(), shape.len(), dtype.code(), opt_handle(key), dev())
    })
}
