// SPDX-License-Identifier: EUPL-1.2
//! Array operations: creation, arithmetic and math, comparisons, reductions,
//! scans, sorting, shapes, indexing and quantisation.
//!
//! Every op is a free function that takes arrays by reference and returns a
//! new lazy [`Array`]; bad arguments (incompatible shapes, out-of-range axes,
//! wrong dtypes) come back as an [`Error`] that names the op. Ops run on the
//! calling thread's current device (see [`crate::device`]).

use std::os::raw::c_int;

use crate::array::{Array, Dtype};
use crate::device::current_code as dev;
use crate::error::{Error, Result};
use crate::ffi::{self, array_out, sys, vec_out};

// ---------------------------------------------------------------- creation

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

// ---------------------------------------------------------------- elementwise

macro_rules! unary_ops {
    ($($(#[$doc:meta])* $name:ident => $code:ident),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(a: &Array) -> Result<Array> {
            // SAFETY: live handle.
            array_out(stringify!($name), |o| unsafe {
                sys::mlxs_unary(o, sys::mlxs_unary_op::$code as c_int, a.as_raw(), dev())
            })
        }
    )*};
}

unary_ops! {
    /// Absolute value.
    abs => MLXS_ABS,
    /// `-a`.
    negative => MLXS_NEGATIVE,
    /// The sign: -1, 0 or 1.
    sign => MLXS_SIGN,
    /// `e^a`.
    exp => MLXS_EXP,
    /// Natural logarithm.
    log => MLXS_LOG,
    /// `ln(1 + a)`.
    log1p => MLXS_LOG1P,
    /// Square root.
    sqrt => MLXS_SQRT,
    /// `1 / sqrt(a)`.
    rsqrt => MLXS_RSQRT,
    /// `1 / a`.
    reciprocal => MLXS_RECIPROCAL,
    /// `a * a`.
    square => MLXS_SQUARE,
    /// Sine.
    sin => MLXS_SIN,
    /// Cosine.
    cos => MLXS_COS,
    /// Hyperbolic tangent.
    tanh => MLXS_TANH,
    /// The logistic sigmoid `1 / (1 + e^-a)`.
    sigmoid => MLXS_SIGMOID,
    /// The error function.
    erf => MLXS_ERF,
    /// Round down.
    floor => MLXS_FLOOR,
    /// Round up.
    ceil => MLXS_CEIL,
    /// Round half to even.
    round => MLXS_ROUND,
    /// Logical not.
    logical_not => MLXS_LOGICAL_NOT,
    /// Whether each element is NaN.
    isnan => MLXS_ISNAN,
    /// Whether each element is infinite.
    isinf => MLXS_ISINF,
    /// The same values, with no gradient flowing back through them.
    stop_gradient => MLXS_STOP_GRADIENT,
    /// A copy.
    copy => MLXS_COPY,
    /// Zeros of the same shape and dtype.
    zeros_like => MLXS_ZEROS_LIKE,
    /// Ones of the same shape and dtype.
    ones_like => MLXS_ONES_LIKE,
    /// The same values in row-contiguous memory.
    contiguous => MLXS_CONTIGUOUS,
}

macro_rules! binary_ops {
    ($($(#[$doc:meta])* $name:ident => $code:ident),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(a: &Array, b: &Array) -> Result<Array> {
            // SAFETY: live handles.
            array_out(stringify!($name), |o| unsafe {
                sys::mlxs_binary(o, sys::mlxs_binary_op::$code as c_int, a.as_raw(), b.as_raw(), dev())
            })
        }
    )*};
}

binary_ops! {
    /// `a + b` with broadcasting.
    add => MLXS_ADD,
    /// `a - b` with broadcasting.
    subtract => MLXS_SUBTRACT,
    /// `a * b` with broadcasting.
    multiply => MLXS_MULTIPLY,
    /// `a / b` with broadcasting (true division).
    divide => MLXS_DIVIDE,
    /// The remainder of `a / b`, with the sign of `b`.
    remainder => MLXS_REMAINDER,
    /// `a ^ b`.
    power => MLXS_POWER,
    /// Elementwise maximum.
    maximum => MLXS_MAXIMUM,
    /// Elementwise minimum.
    minimum => MLXS_MINIMUM,
    /// `a == b`.
    equal => MLXS_EQUAL,
    /// `a != b`.
    not_equal => MLXS_NOT_EQUAL,
    /// `a > b`.
    greater => MLXS_GREATER,
    /// `a >= b`.
    greater_equal => MLXS_GREATER_EQUAL,
    /// `a < b`.
    less => MLXS_LESS,
    /// `a <= b`.
    less_equal => MLXS_LESS_EQUAL,
    /// Logical and.
    logical_and => MLXS_LOGICAL_AND,
    /// Logical or.
    logical_or => MLXS_LOGICAL_OR,
    /// Matrix product with batch broadcasting (`a @ b`).
    matmul => MLXS_MATMUL,
    /// `log(e^a + e^b)`, computed stably.
    logaddexp => MLXS_LOGADDEXP,
    /// `floor(a / b)`.
    floor_divide => MLXS_FLOOR_DIVIDE,
}

/// A scalar for arithmetic with `a` that keeps `a`'s dtype where it can (like
/// a Python scalar in MLX): floats take `a`'s float dtype, integral values
/// take `a`'s integer dtype, anything else is `float32`.
pub fn scalar_like(a: &Array, value: f64) -> Result<Array> {
    let d = a.dtype();
    let dtype = if d.is_float() || (d.is_integer() && value.fract() == 0.0) { d } else { Dtype::Float32 };
    Array::scalar_as(value, dtype)
}

/// `a + value`, keeping `a`'s dtype.
pub fn add_scalar(a: &Array, value: f64) -> Result<Array> {
    add(a, &scalar_like(a, value)?)
}

/// `a * value`, keeping `a`'s dtype.
pub fn multiply_scalar(a: &Array, value: f64) -> Result<Array> {
    multiply(a, &scalar_like(a, value)?)
}

/// `a - value`, keeping `a`'s dtype.
pub fn subtract_scalar(a: &Array, value: f64) -> Result<Array> {
    subtract(a, &scalar_like(a, value)?)
}

/// `a / value`, keeping `a`'s float dtype.
pub fn divide_scalar(a: &Array, value: f64) -> Result<Array> {
    divide(a, &scalar_like(a, value)?)
}

/// `cond ? x : y`, elementwise with broadcasting.
pub fn where_(cond: &Array, x: &Array, y: &Array) -> Result<Array> {
    // SAFETY: live handles.
    array_out("where", |o| unsafe { sys::mlxs_where(o, cond.as_raw(), x.as_raw(), y.as_raw(), dev()) })
}

/// Clamps `a` to `[lo, hi]`; either bound may be absent.
pub fn clip(a: &Array, lo: Option<&Array>, hi: Option<&Array>) -> Result<Array> {
    if lo.is_none() && hi.is_none() {
        return Err(Error::invalid("clip", "at least one of the bounds must be given"));
    }
    // SAFETY: live or null handles.
    array_out("clip", |o| unsafe { sys::mlxs_clip(o, a.as_raw(), ffi::opt_handle(lo), ffi::opt_handle(hi), dev()) })
}

/// The values converted to `dtype`.
pub fn astype(a: &Array, dtype: Dtype) -> Result<Array> {
    // SAFETY: live handle.
    array_out("astype", |o| unsafe { sys::mlxs_astype(o, a.as_raw(), dtype.code(), dev()) })
}

/// `alpha * (a @ b) + beta * c`.
pub fn addmm(c: &Array, a: &Array, b: &Array, alpha: f32, beta: f32) -> Result<Array> {
    // SAFETY: live handles.
    array_out("addmm", |o| unsafe { sys::mlxs_addmm(o, c.as_raw(), a.as_raw(), b.as_raw(), alpha, beta, dev()) })
}

/// The lower triangle (at and below diagonal `k`) of the last two axes.
pub fn tril(a: &Array, k: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("tril", |o| unsafe { sys::mlxs_tril(o, a.as_raw(), k, dev()) })
}

/// The upper triangle (at and above diagonal `k`) of the last two axes.
pub fn triu(a: &Array, k: i32) -> Result<Array> {
    // SAFETY: live handle.
    array_out("triu", |o| unsafe { sys::mlxs_triu(o, a.as_raw(), k, dev()) })
}

// ---------------------------------------------------------------- reductions

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

// ---------------------------------------------------------------- shapes

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

/// Options of [`conv2d`]: `(height, width)` pairs and the group count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    /// Step between windows.
    pub stride: (i32, i32),
    /// Zeros added on each side.
    pub padding: (i32, i32),
    /// Spacing of the kernel taps.
    pub dilation: (i32, i32),
    /// Channel groups.
    pub groups: i32,
}

impl Default for Conv2d {
    fn default() -> Self {
        Conv2d { stride: (1, 1), padding: (0, 0), dilation: (1, 1), groups: 1 }
    }
}

/// 2-D convolution of `input: [N, H, W, C_in]` (channels last, MLX's layout)
/// with `weight: [C_out, kH, kW, C_in / groups]`.
pub fn conv2d(input: &Array, weight: &Array, opts: Conv2d) -> Result<Array> {
    // SAFETY: live handles.
    array_out("conv2d", |o| unsafe {
        sys::mlxs_conv2d(
            o,
            input.as_raw(),
            weight.as_raw(),
            opts.stride.0,
            opts.stride.1,
            opts.padding.0,
            opts.padding.1,
            opts.dilation.0,
            opts.dilation.1,
            opts.groups,
            dev(),
        )
    })
}

// ---------------------------------------------------------------- indexing

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

// ---------------------------------------------------------------- quantisation

/// An affine-quantised matrix: packed weights with per-group scales and biases.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// Packed weights (uint32).
    pub weight: Array,
    /// One scale per group.
    pub scales: Array,
    /// One bias per group (affine mode).
    pub biases: Option<Array>,
    /// Elements per group.
    pub group_size: i32,
    /// Bits per element.
    pub bits: i32,
}

fn check_quant(op: &'static str, group_size: i32, bits: i32) -> Result<()> {
    if ![32, 64, 128].contains(&group_size) {
        return Err(Error::invalid(op, format!("group size {group_size} is not one of 32, 64 or 128")));
    }
    if ![2, 3, 4, 5, 6, 8].contains(&bits) {
        return Err(Error::invalid(op, format!("{bits} bits is not one of 2, 3, 4, 5, 6 or 8")));
    }
    Ok(())
}

/// Quantises the last axis of `w` in groups of `group_size` to `bits` bits
/// (MLX's affine mode).
pub fn quantize(w: &Array, group_size: i32, bits: i32) -> Result<Quantized> {
    check_quant("quantize", group_size, bits)?;
    let mut parts = vec_out("quantize", |o| {
        // SAFETY: live handle; mode NULL means affine.
        unsafe { sys::mlxs_quantize(o, w.as_raw(), group_size, bits, std::ptr::null(), dev()) }
    })?
    .into_iter();
    let weight = parts.next().ok_or_else(|| Error::invalid("quantize", "MLX returned no weights"))?;
    let scales = parts.next().ok_or_else(|| Error::invalid("quantize", "MLX returned no scales"))?;
    Ok(Quantized { weight, scales, biases: parts.next(), group_size, bits })
}

/// Unpacks quantised weights back to floats (`dtype`, or the scales' dtype).
pub fn dequantize(q: &Quantized, dtype: Option<Dtype>) -> Result<Array> {
    check_quant("dequantize", q.group_size, q.bits)?;
    let out_dtype = dtype.map_or(-1, Dtype::code);
    // SAFETY: live or null handles.
    array_out("dequantize", |o| unsafe {
        sys::mlxs_dequantize(
            o,
            q.weight.as_raw(),
            q.scales.as_raw(),
            ffi::opt_handle(q.biases.as_ref()),
            q.group_size,
            q.bits,
            std::ptr::null(),
            out_dtype,
            dev(),
        )
    })
}

/// `x @ dequantize(w).T` (or without the transpose) without unpacking `w`.
pub fn quantized_matmul(x: &Array, q: &Quantized, transpose: bool) -> Result<Array> {
    check_quant("quantized_matmul", q.group_size, q.bits)?;
    // SAFETY: live or null handles.
    array_out("quantized_matmul", |o| unsafe {
        sys::mlxs_quantized_matmul(
            o,
            x.as_raw(),
            q.weight.as_raw(),
            q.scales.as_raw(),
            ffi::opt_handle(q.biases.as_ref()),
            transpose,
            q.group_size,
            q.bits,
            std::ptr::null(),
            dev(),
        )
    })
}

/// Batched matmul that picks the matrices of `a` and `b` by index
/// (mixture-of-experts routing). Indices outside the batch are clamped as in
/// [`take`].
pub fn gather_mm(
    a: &Array,
    b: &Array,
    lhs_indices: Option<&Array>,
    rhs_indices: Option<&Array>,
    sorted_indices: bool,
) -> Result<Array> {
    // SAFETY: live or null handles.
    array_out("gather_mm", |o| unsafe {
        sys::mlxs_gather_mm(
            o,
            a.as_raw(),
            b.as_raw(),
            ffi::opt_handle(lhs_indices),
            ffi::opt_handle(rhs_indices),
            sorted_indices,
            dev(),
        )
    })
}

/// The quantised form of [`gather_mm`] (indices clamped likewise).
pub fn gather_qmm(
    x: &Array,
    q: &Quantized,
    lhs_indices: Option<&Array>,
    rhs_indices: Option<&Array>,
    transpose: bool,
    sorted_indices: bool,
) -> Result<Array> {
    check_quant("gather_qmm", q.group_size, q.bits)?;
    // SAFETY: live or null handles.
    array_out("gather_qmm", |o| unsafe {
        sys::mlxs_gather_qmm(
            o,
            x.as_raw(),
            q.weight.as_raw(),
            q.scales.as_raw(),
            ffi::opt_handle(q.biases.as_ref()),
            ffi::opt_handle(lhs_indices),
            ffi::opt_handle(rhs_indices),
            transpose,
            q.group_size,
            q.bits,
            std::ptr::null(),
            sorted_indices,
            dev(),
        )
    })
}

/// Number of elements implied by a shape, for callers building buffers.
pub fn shape_size(op: &'static str, shape: &[i32]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d).map_err(|_| Error::invalid(op, format!("negative dimension in shape {shape:?}")))?;
        acc.checked_mul(d).ok_or_else(|| Error::invalid(op, format!("shape {shape:?} is too large")))
    })
}
