// SPDX-License-Identifier: EUPL-1.2
//! Matrix ops beyond `matmul`: the fused `addmm`, triangles of the last two
//! axes and 2-D convolution.

use crate::array::Array;
use crate::device::current_code as dev;
use crate::error::Result;
use crate::ffi::{array_out, sys};

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
