// SPDX-License-Identifier: EUPL-1.2
//! Affine quantisation: quantising and dequantising matrices, the quantised
//! matmul, and the gathered (mixture-of-experts) matmuls.

use crate::array::{Array, Dtype};
use crate::device::current_code as dev;
use crate::error::{Error, Result};
use crate::ffi::{self, array_out, sys, vec_out};

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

/// `x` times the affine-quantised `[out, in]` matrix `q` (transposed), in
/// float32: `x @ Wᵀ` with `W = scales · q + biases` computed in float32 (as
/// [`dequantize`] after casting the scales and biases to float32; MLX's
/// dequantise computes in their own type).
///
/// For float32 `x` of at most 32 rows, 4 or 8 bits, with biases, on the CPU it
/// runs our kernel, which reads `q` packed and sums `scale · Σ q·x + bias · Σ x`
/// per group in float32 (the float32 dequantised values, up to the order of
/// the sums): a decode step's output head reads a quarter (8-bit) or an
/// eighth (4-bit) of the bytes of a dense float32 copy. Elsewhere it
/// dequantises to float32 and multiplies.
///
/// # Errors
///
/// An invalid group size or bit width, or shapes that do not fit.
pub fn widen_quantized_matmul(x: &Array, q: &Quantized) -> Result<Array> {
    check_quant("widen_quantized_matmul", q.group_size, q.bits)?;
    // SAFETY: live or null handles.
    array_out("widen_quantized_matmul", |o| unsafe {
        sys::mlxs_widen_quantized_matmul(
            o,
            x.as_raw(),
            q.weight.as_raw(),
            q.scales.as_raw(),
            ffi::opt_handle(q.biases.as_ref()),
            q.group_size,
            q.bits,
            dev(),
        )
    })
}

/// Whether [`widen_quantized_matmul`] of these runs our kernel on the current
/// device (otherwise it dequantises and multiplies).
pub fn widen_quantized_matmul_applies(x: &Array, q: &Quantized) -> Result<bool> {
    let mut yes = false;
    // SAFETY: live or null handles; `yes` is a valid place for the answer.
    let status = unsafe {
        sys::mlxs_widen_quantized_matmul_applies(
            x.as_raw(),
            q.weight.as_raw(),
            q.scales.as_raw(),
            ffi::opt_handle(q.biases.as_ref()),
            q.group_size,
            q.bits,
            dev(),
            &mut yes,
        )
    };
    ffi::check("widen_quantized_matmul_applies", status)?;
    Ok(yes)
}

/// Batched matmul that picks the matrices of `a` and `b` by index
/// (mixture-of-experts routing). Indices outside the batch are clamped as in
/// [`take`](super::take).
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
