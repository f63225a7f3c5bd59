// SPDX-License-Identifier: EUPL-1.2
//! Reductions over axes, arg-reductions, softmax, scans (cumulative sums and
//! the like), sorting, top-k and partitions.

use std::os::raw::c_int;

use crate::array::Array;
use crate::device::current_code as dev;
use crate::error::{Error, Result};
use crate::ffi::{array_out, sys};

fn reduce(op: &'static str, code: u32, a: &Array, axes: Option<&[i32]>, keepdims: bool) -> Result<Array> {
    let (ptr, len, all) = match axes {
        Some(ax) => (ax.as_ptr(), ax.len(), false),
        None => (std::ptr::null(), 0, true),
    };
    // SAFETY: axes valid for len; live handle.
    array_out(op, |o| unsafe { sys::mlxs_reduce(o, code as c_int, a.as_raw(), ptr, len, all, keepdims, dev()) })
}

macro_rules! reductions {
    ($($(#[$doc:meta])* $name:ident, $all:ident => $code:ident),* $(,)?) => {$(
        $(#[$doc])*
        ///
        /// Reduces over `axes` (negative axes count from the end).
        pub fn $name(a: &Array, axes: &[i32], keepdims: bool) -> Result<Array> {
            reduce(stringify!($name), sys::mlxs_reduce_op::$code, a, Some(axes), keepdims)
        }

        $(#[$doc])*
        ///
        /// Reduces over every axis.
        pub fn $all(a: &Array, keepdims: bool) -> Result<Array> {
            reduce(stringify!($name), sys::mlxs_reduce_op::$code, a, None, keepdims)
        }
    )*};
}

reductions! {
    /// Sum.
    sum, sum_all => MLXS_SUM,
    /// Arithmetic mean.
    mean, mean_all => MLXS_MEAN,
    /// Maximum.
    max, max_all => MLXS_MAX,
    /// Minimum.
    min, min_all => MLXS_MIN,
    /// Product.
    prod, prod_all => MLXS_PROD,
    /// Whether all elements are true.
    all, all_all => MLXS_ALL,
    /// Whether any element is true.
    any, any_all => MLXS_ANY,
    /// `log(sum(exp(a)))`, computed stably.
    logsumexp, logsumexp_all => MLXS_LOGSUMEXP,
    /// Variance (population, ddof 0).
    var, var_all => MLXS_VAR,
    /// Standard deviation (population, ddof 0).
    std, std_all => MLXS_STD,
}

/// Index of the maximum along `axis`.
pub fn argmax(a: &Array, axis: i32, keepdims: bool) -> Result<Array> {
    // SAFETY: live handle.
    array_out("argmax", |o| unsafe { sys::mlxs_argmax(o, a.as_raw(), axis, keepdims, dev()) })
}

/// Index of the minimum along `axis`.
pub fn argmin(a: &Array, axis: i32, keepdims: bool) -> Result<Array> {
    // SAFETY: live handle.
    array_out("argmin", |o| unsafe { sys::mlxs_argmin(o, a.as_raw(), axis, keepdims, dev()) })
}

/// Softmax over `axes`; `precise` computes in float32 for low-precision inputs.
pub fn softmax(a: &Array, axes: &[i32], precise: bool) -> Result<Array> {
    if axes.is_empty() {
        return Err(Error::invalid("softmax", "at least one axis is needed"));
    }
    // SAFETY: axes valid for its length.
    array_out("softmax", |o| unsafe { sys::mlxs_softmax(o, a.as_raw(), axes.as_ptr(), axes.len(), precise, dev()) })
}

fn scan(op: &'static str, code: u32, a: &Array, axis: i32, reverse: bool, inclusive: bool) -> Result<Array> {
    // SAFETY: live handle.
    array_out(op, |o| unsafe { sys::mlxs_scan(o, code as c_int, a.as_raw(), axis, reverse, inclusive, dev()) })
}

/// Cumulative sum along `axis`.
pub fn cumsum(a: &Array, axis: i32, reverse: bool, inclusive: bool) -> Result<Array> {
    scan("cumsum", sys::mlxs_scan_op::MLXS_CUMSUM, a, axis, reverse, inclusive)
}

/// Cumulative product along `axis`.
pub fn cumprod(a: &Array, axis: i32, reverse: bool, inclusive: bool) -> Result<Array> {
    scan("cumprod", sys::mlxs_scan_op::MLXS_CUMPROD, a, axis, reverse, inclusive)
}

/// Running maximum along `axis`.
pub fn cummax(a: &Array, axis: i32, reverse: bool, inclusive: bool) -> Result<Array> {
    scan("cummax", sys::mlxs_scan_op::MLXS_CUMMAX, a, axis, reverse, inclusive)
}

/// Running minimum along `axis`.
pub fn cummin(a: &Array, axis: i32, reverse: bool, inclusive: bool) -> Result<Array> {
    scan("cummin", sys::mlxs_scan_op::MLXS_CUMMIN, a, axis, reverse, inclusive)
}

/// Cumulative `logsumexp` along `axis`.
pub fn logcumsumexp(a: &Array, axis: i32, reverse: bool, inclusive: bool) -> Result<Array> {
    scan("logcumsumexp", sys::mlxs_scan_op::MLXS_LOGCUMSUMEXP, a, axis, reverse, inclusive)
}

/// The `k` largest values along `axis` (in no particular order).
pub fn topk(a: &Array, k: i32, axis: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("topk", |o| unsafe { sys::mlxs_topk(o, a.as_raw(), k, axis, dev()) })
}

/// Sorted along `axis`, ascending.
pub fn sort(a: &Array, axis: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("sort", |o| unsafe { sys::mlxs_sort(o, a.as_raw(), axis, dev()) })
}

/// Indices that sort `a` along `axis`, ascending.
pub fn argsort(a: &Array, axis: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("argsort", |o| unsafe { sys::mlxs_argsort(o, a.as_raw(), axis, dev()) })
}

/// Indices that partition `a` along `axis` so the `kth` element is in place,
/// smaller ones before it and larger ones after it.
pub fn argpartition(a: &Array, kth: i32, axis: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("argpartition", |o| unsafe { sys::mlxs_argpartition(o, a.as_raw(), kth, axis, dev()) })
}

/// `a` partitioned along `axis` around its `kth` element.
pub fn partition(a: &Array, kth: i32, axis: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("partition", |o| unsafe { sys::mlxs_partition(o, a.as_raw(), kth, axis, dev()) })
}
