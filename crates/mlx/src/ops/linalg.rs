// SPDX-License-Identifier: EUPL-1.2
//! Matrix ops beyond `matmul`: the fused `addmm`, the widening
//! [`widen_matmul`], triangles of the last two
//! axes and 2-D convolution.

use crate::array::Array;
use crate::device::current_code as dev;
use crate::error::Result;
use crate::ffi::{array_out, check, sys};

/// `alpha * (a @ b) + beta * c`.
pub fn addmm(c: &Array, a: &Array, b: &Array, alpha: f32, beta: f32) -> Result<Array> {
    // SAFETY: live handles.
    array_out("addmm", |o| unsafe { sys::mlxs_addmm(o, c.as_raw(), a.as_raw(), b.as_raw(), alpha, beta, dev()) })
}

/// `x @ wᵀ` for `w: [out, in]`, with `matmul`'s type promotion: the same
/// result as [`matmul`](super::matmul) of `x` and `w`'s transpose.
///
/// For float32 `x` of at most 32 rows and a bfloat16 or float16 `w` on the
/// CPU it runs our kernel, which reads `w` in its 16-bit type and computes
/// in float32 (a 16-bit value widens to float32 exactly, so only the order of
/// the sums differs from float32 `w`). Reading half the bytes, a model's
/// output head for one token takes a quarter of the float32 matmul's time
/// on OpenBLAS; MLX's own promotion copies `w` to float32 on every call
/// (`mlxs_widen.cpp` has the figures).
///
/// # Errors
///
/// When `w` is not 2-D or the shapes do not fit a matmul.
pub fn widen_matmul(x: &Array, w: &Array) -> Result<Array> {
    // SAFETY: live handles.
    array_out("widen_matmul", |o| unsafe { sys::mlxs_widen_matmul(o, x.as_raw(), w.as_raw(), dev()) })
}

/// Whether [`widen_matmul`] of these arrays runs our kernel on the current
/// device (otherwise it is MLX's matmul).
pub fn widen_matmul_applies(x: &Array, w: &Array) -> Result<bool> {
    let mut yes = false;
    // SAFETY: live handles; `yes` is a valid place for the answer.
    check("widen_matmul_applies", unsafe { sys::mlxs_widen_matmul_applies(x.as_raw(), w.as_raw(), dev(), &mut yes) })?;
    Ok(yes)
}

/// Whether [`widen_matmul`]'s kernel may use the x86 AVX2 path where the CPU
/// has it (the default); `false` runs its portable loop, the one CPUs without
/// AVX2 run (for tests). Process-wide.
pub fn set_widen_simd(on: bool) -> Result<()> {
    // SAFETY: no pointers.
    check("set_widen_simd", unsafe { sys::mlxs_set_widen_simd(on) })
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
