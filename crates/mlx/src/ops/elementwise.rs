// SPDX-License-Identifier: EUPL-1.2
//! Elementwise ops: unary math, binary arithmetic and comparisons with
//! broadcasting, arithmetic with scalars, selection, clamping and casts.

use std::os::raw::c_int;

use crate::array::{Array, Dtype};
use crate::device::current_code as dev;
use crate::error::{Error, Result};
use crate::ffi::{self, array_out, sys};

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
