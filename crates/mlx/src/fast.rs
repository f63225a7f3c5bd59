// SPDX-License-Identifier: EUPL-1.2
//! MLX's fused kernels (`mlx::core::fast`): RMS norm, layer norm, rotary
//! position embeddings and scaled dot-product attention; and the switch for
//! our own GPU kernels ([`set_custom_kernels`]).

use crate::array::Array;
use crate::device::current_code as dev;
use crate::error::{Error, Result};
use crate::ffi::{array_out, opt_handle, sys};

/// `x / sqrt(mean(x², -1) + eps) * weight` over the last axis; no scale when
/// `weight` is `None`.
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    // SAFETY: live or null handles.
    array_out("rms_norm", |o| unsafe { sys::mlxs_rms_norm(o, x.as_raw(), opt_handle(weight), eps, dev()) })
}

/// A residual sum and the norm after it, as one step: `h = x + rms_norm(r,
/// r_weight)` (`x + r` when `r_weight` is `None`) and, with `h_weight`, `y =
/// rms_norm(h, h_weight)`; both norms with `eps`. Returns `(h, y)`.
///
/// On CUDA this is one kernel of ours where the inputs fit it (16-bit floats,
/// rows of at most 65,536 values; `MLXR_CUSTOM_KERNELS=0` turns it off), whose
/// norms sum their squares in another order than MLX's and so may differ from
/// [`rms_norm`]'s in the last bit. Elsewhere it is exactly [`rms_norm`] and an
/// add.
pub fn fused_norm_add(
    x: &Array,
    r: &Array,
    r_weight: Option<&Array>,
    h_weight: Option<&Array>,
    eps: f32,
) -> Result<(Array, Option<Array>)> {
    let (mut h, mut y): (sys::mlxs_array, sys::mlxs_array) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: live or null handles; the shim writes owned handles (or null for y) on success.
    let status = unsafe {
        sys::mlxs_fused_norm_add(
            &mut h,
            &mut y,
            x.as_raw(),
            r.as_raw(),
            opt_handle(r_weight),
            opt_handle(h_weight),
            eps,
            dev(),
        )
    };
    crate::ffi::check("fused_norm_add", status)?;
    // SAFETY: on success each non-null handle is owned by the caller.
    let y = std::ptr::NonNull::new(y).map(|raw| unsafe { Array::from_raw(raw) });
    let h = std::ptr::NonNull::new(h)
        .ok_or(Error::Mlx { op: "fused_norm_add", message: "the shim returned no sum".into() })?;
    // SAFETY: as above.
    Ok((unsafe { Array::from_raw(h) }, y))
}

/// [`fused_norm_add`]'s `h` and its norm `y = rms_norm(h, h_weight)` times the
/// 4-bit affine matrix `q` (transposed, as a linear layer holds it), as one
/// kernel of ours where it applies: CUDA, one row of `x` (a decode step), 16-bit
/// floats, where our one-row product kernel would take `y`; the same bits as
/// [`fused_norm_add`] and [`crate::ops::quantized_matmul`] give there. Returns
/// `Some((h, y qᵀ))`, or `None` where it does not apply (the caller composes
/// the two; `y` itself is never returned).
///
/// With `rope = Some((heads, head_dim, rotation))` the first `heads` heads of
/// `head_dim` values of the product come out rotated as [`qk_norm_rope`]
/// (without a norm) rotates them, bit for bit: a fused q/k/v projection's
/// queries and keys, laid out as its output is (`[.., N]`). Only for
/// `rotation`s of all `head_dim` features, not traditional, at a fixed
/// offset; `None` elsewhere.
pub fn fused_norm_add_quantized_matmul(
    x: &Array,
    r: &Array,
    r_weight: Option<&Array>,
    h_weight: &Array,
    eps: f32,
    q: &crate::ops::Quantized,
    rope: Option<(i32, i32, &Rotation<'_>)>,
) -> Result<Option<(Array, Array)>> {
    let (mut rope_heads, mut head_dim, mut has_base, mut base, mut scale, mut offset, mut freqs) =
        (0, 0, false, 0.0, 1.0, 0, None);
    if let Some((heads, d, rotation)) = rope {
        let RopeOffset::Fixed(fixed) = rotation.offset else { return Ok(None) };
        if rotation.traditional || rotation.dims != d || heads <= 0 {
            return Ok(None);
        }
        (rope_heads, head_dim, scale, offset) = (heads, d, rotation.scale, fixed);
        (has_base, base, freqs) = rotation.freqs.parts();
    }
    let (mut h, mut out): (sys::mlxs_array, sys::mlxs_array) = (std::ptr::null_mut(), std::ptr::null_mut());
    let mut applied = 0;
    // SAFETY: live or null handles; the shim writes owned handles on success when it sets `applied`.
    let status = unsafe {
        sys::mlxs_fused_norm_add_qmv(
            &mut h,
            &mut out,
            &mut applied,
            x.as_raw(),
            r.as_raw(),
            opt_handle(r_weight),
            h_weight.as_raw(),
            eps,
            q.weight.as_raw(),
            q.scales.as_raw(),
            opt_handle(q.biases.as_ref()),
            q.group_size,
            q.bits,
            rope_heads,
            head_dim,
            has_base,
            base,
            scale,
            offset,
            opt_handle(freqs),
            dev(),
        )
    };
    crate::ffi::check("fused_norm_add_quantized_matmul", status)?;
    if applied == 0 {
        return Ok(None);
    }
    // SAFETY: on success with `applied` set each non-null handle is owned by the caller.
    let own = |raw| std::ptr::NonNull::new(raw).map(|raw| unsafe { Array::from_raw(raw) });
    match (own(h), own(out)) {
        (Some(h), Some(out)) => Ok(Some((h, out))),
        _ => Err(Error::Mlx { op: "fused_norm_add_quantized_matmul", message: "the shim returned no array".into() }),
    }
}

/// Layer norm over the last axis with optional scale and shift.
pub fn layer_norm(x: &Array, weight: Option<&Array>, bias: Option<&Array>, eps: f32) -> Result<Array> {
    // SAFETY: live or null handles.
    array_out("layer_norm", |o| unsafe {
        sys::mlxs_layer_norm(o, x.as_raw(), opt_handle(weight), opt_handle(bias), eps, dev())
    })
}

/// Where the rotation frequencies of [`rope`] come from.
#[derive(Debug, Clone, Copy)]
pub enum RopeFreqs<'a> {
    /// `base^(-2i/dims)`, the classic formulation.
    Base(f32),
    /// Explicit per-pair inverse frequencies, `dims / 2` of them (e.g. Llama 3
    /// rope scaling). MLX divides positions by these.
    Custom(&'a Array),
}

impl<'a> RopeFreqs<'a> {
    /// The shim's form: whether there is a base, the base, the frequencies.
    fn parts(self) -> (bool, f32, Option<&'a Array>) {
        match self {
            RopeFreqs::Base(b) => (true, b, None),
            RopeFreqs::Custom(f) => (false, 0.0, Some(f)),
        }
    }
}

/// Where the positions of [`rope`] start.
#[derive(Debug, Clone, Copy)]
pub enum RopeOffset<'a> {
    /// A fixed offset.
    Fixed(i32),
    /// An int array (scalar, or one offset per batch row).
    Array(&'a Array),
}

impl<'a> RopeOffset<'a> {
    /// The shim's form: the fixed offset, or the offsets' array.
    fn parts(self) -> (i32, Option<&'a Array>) {
        match self {
            RopeOffset::Fixed(o) => (o, None),
            RopeOffset::Array(a) => (0, Some(a)),
        }
    }
}

/// A rope rotates pairs: `dims` must be positive and even.
fn check_rotated_dims(op: &'static str, dims: i32) -> Result<()> {
    if dims <= 0 || dims % 2 != 0 {
        return Err(Error::invalid(op, format!("dims {dims} must be a positive even number")));
    }
    Ok(())
}

/// Rotary position embedding on the first `dims` features of the last axis of
/// `x` (shape `[..., L, D]`), positions `offset..offset + L`. `traditional`
/// rotates adjacent pairs instead of the two halves.
pub fn rope(
    x: &Array,
    dims: i32,
    traditional: bool,
    freqs: RopeFreqs<'_>,
    scale: f32,
    offset: RopeOffset<'_>,
) -> Result<Array> {
    check_rotated_dims("rope", dims)?;
    let ((has_base, base, freqs_arr), (off, off_arr)) = (freqs.parts(), offset.parts());
    // SAFETY: live or null handles.
    array_out("rope", |o| unsafe {
        sys::mlxs_rope(
            o,
            x.as_raw(),
            dims,
            traditional,
            has_base,
            base,
            scale,
            off,
            opt_handle(off_arr),
            opt_handle(freqs_arr),
            dev(),
        )
    })
}

/// A rotation as [`rope`] takes it: over the first `dims` features,
/// `traditional` pairs, the frequencies, the position scale and where the
/// positions start.
#[derive(Debug, Clone, Copy)]
pub struct Rotation<'a> {
    /// Rotated features.
    pub dims: i32,
    /// Rotate adjacent pairs instead of the two halves.
    pub traditional: bool,
    /// Where the frequencies come from.
    pub freqs: RopeFreqs<'a>,
    /// Position scale.
    pub scale: f32,
    /// Where the positions start.
    pub offset: RopeOffset<'a>,
}

/// The q and k heads of a fused q/k/v projection, normed and rotated: the
/// first `heads` heads of `head_dim` values of `y: [B, L, N]` (q's heads then
/// k's, side by side from the start of each position's features) as `[B,
/// heads, L, head_dim]`, RMS-normed over each head with `norm`'s weight
/// (`[heads, 1, head_dim]`, each head's own row) and eps when given, then
/// rotated by `rotation` as [`rope`] rotates.
///
/// On CUDA this is one kernel of ours where the inputs fit it (16-bit floats,
/// the whole head rotated, head sizes a multiple of 64 up to 512, one offset or
/// one a batch row; `MLXR_CUSTOM_KERNELS=0` turns it off), whose norm sums its
/// squares in another order than MLX's and so may differ in the last bit
/// (checked on an H100 against MLX's ops, `tests/custom_kernels.rs`).
/// Elsewhere it is exactly MLX's slice, reshape, [`rms_norm`] without a
/// weight, the product with the weight and [`rope`].
pub fn qk_norm_rope(
    y: &Array,
    heads: i32,
    head_dim: i32,
    norm: Option<(&Array, f32)>,
    rotation: &Rotation<'_>,
) -> Result<Array> {
    check_rotated_dims("qk_norm_rope", rotation.dims)?;
    let ((has_base, base, freqs), (off, off_arr)) = (rotation.freqs.parts(), rotation.offset.parts());
    let (weight, eps) = match norm {
        Some((w, eps)) => (Some(w), eps),
        None => (None, 0.0),
    };
    // SAFETY: live or null handles.
    array_out("qk_norm_rope", |o| unsafe {
        sys::mlxs_qk_norm_rope(
            o,
            y.as_raw(),
            heads,
            head_dim,
            opt_handle(weight),
            eps,
            rotation.dims,
            rotation.traditional,
            has_base,
            base,
            rotation.scale,
            off,
            opt_handle(off_arr),
            opt_handle(freqs),
            dev(),
        )
    })
}

/// The mask of [`scaled_dot_product_attention`].
#[derive(Debug, Clone, Copy)]
pub enum AttentionMask<'a> {
    /// Every query sees every key.
    None,
    /// Query `i` sees keys `0..=i + (kL - qL)` (lower-right aligned).
    Causal,
    /// A boolean mask (true = attend) or an additive float mask, broadcastable
    /// to `[B, H, qL, kL]`.
    Array(&'a Array),
}

/// `softmax(q @ kᵀ * scale + mask) @ v` for `q: [B, H, qL, D]`,
/// `k, v: [B, H_kv, kL, D]` (grouped-query attention when `H_kv < H`).
/// `sinks` adds per-head attention-sink logits.
pub fn scaled_dot_product_attention(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    mask: AttentionMask<'_>,
    sinks: Option<&Array>,
) -> Result<Array> {
    let (mode, arr) = mask_parts(mask);
    // SAFETY: live or null handles; mode is a static C string.
    array_out("scaled_dot_product_attention", |o| unsafe {
        sys::mlxs_sdpa(
            o,
            q.as_raw(),
            k.as_raw(),
            v.as_raw(),
            scale,
            mode.as_ptr(),
            opt_handle(arr),
            opt_handle(sinks),
            dev(),
        )
    })
}

/// The form [`scaled_dot_product_attention`] takes on CUDA for queries of at
/// most 8 positions (decode steps, speculative verification) under a mask,
/// or a batch's whose head size MLX's vector kernel lacks: `softmax(q @ kᵀ * scale +
/// mask) @ v` as two matmuls with the query heads of each key/value head
/// folded into the rows, `q: [B, H, qL, D]` read as `[B, H_kv, H / H_kv · qL, D]`.
/// MLX's own unfused attention broadcasts `k` and `v` over the grouped heads
/// instead, which its CUDA backend runs as one cuBLAS call per batch row and
/// key/value head. The same steps as MLX's: `q` scaled first, hidden scores at
/// the type's lowest value, a precise softmax; for several queries of a 16-bit
/// type the scores and softmax in float32 and the probabilities rounded to the
/// type for the product with `v`, as cuDNN's fused attention (which MLX's CUDA
/// backend takes there) computes them. Runs on any device (tests compare it
/// with [`scaled_dot_product_attention`] on the CPU).
///
/// `mask`: [`AttentionMask::Causal`] (lower-right aligned), a boolean (true
/// attends) or additive array of `q`'s type broadcasting to `[B, H, qL, kL]`
/// with batch and head dimensions of 1 or full size, or none. No sinks.
///
/// # Errors
///
/// When `q`, `k` and `v` are not 4-D of one floating type with whole groups
/// of query heads per key/value head and at most as many queries as keys, or
/// the mask does not fit.
pub fn grouped_attention(q: &Array, k: &Array, v: &Array, scale: f32, mask: AttentionMask<'_>) -> Result<Array> {
    let (mode, arr) = mask_parts(mask);
    // SAFETY: live or null handles; mode is a static C string.
    array_out("grouped_attention", |o| unsafe {
        sys::mlxs_sdpa_grouped(o, q.as_raw(), k.as_raw(), v.as_raw(), scale, mode.as_ptr(), opt_handle(arr), dev())
    })
}

/// The shim's mask mode and mask array for `mask`.
fn mask_parts(mask: AttentionMask<'_>) -> (&'static std::ffi::CStr, Option<&Array>) {
    match mask {
        AttentionMask::None => (c"", None),
        AttentionMask::Causal => (c"causal", None),
        AttentionMask::Array(m) => (c"array", Some(m)),
    }
}

/// When mlx-metal's own GPU kernels run in place of MLX's. They exist where
/// MLX's are the bottleneck and ours give the same result within rounding
/// (today: 4-bit affine matrix-vector products on CUDA, the projections of a
/// decode step; `csrc/mlxs_kernels.cpp`, measured in docs/benchmarks.md).
/// On a CPU stream the switch also covers [`rms_norm`] and [`rope`] of float32
/// inputs as one node each instead of MLX's compositions of a dozen ops (the
/// same values; `csrc/mlxs_cpu_fast.cpp`): on with `Auto` and `Always`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CustomKernels {
    /// Never: MLX's kernels everywhere.
    Off,
    /// Where they pay: matrices of at least 4,096 × 4,096 values. A custom
    /// kernel costs more host time per call than MLX's own, which a small
    /// model's decode step (bound by host time) would feel. The default.
    Auto,
    /// Wherever they apply, whatever the size (tests, measurements).
    Always,
}

/// Sets [`CustomKernels`] for the whole process. The default is
/// [`CustomKernels::Auto`]; `MLXR_CUSTOM_KERNELS=0` (off) or `=always` in the
/// environment changes it. Graphs already built keep the kernels they were
/// built with.
pub fn set_custom_kernels(mode: CustomKernels) {
    let code = match mode {
        CustomKernels::Off => sys::mlxs_kernels_mode::MLXS_KERNELS_OFF,
        CustomKernels::Auto => sys::mlxs_kernels_mode::MLXS_KERNELS_AUTO,
        CustomKernels::Always => sys::mlxs_kernels_mode::MLXS_KERNELS_ALWAYS,
    };
    // SAFETY: plain call; an atomic store. The code is one of the three the
    // shim accepts, so it cannot fail.
    let _ = unsafe { sys::mlxs_set_custom_kernels(code as std::os::raw::c_int) };
}

/// The current [`CustomKernels`] mode.
pub fn custom_kernels() -> CustomKernels {
    // SAFETY: plain call; an atomic load.
    let code = unsafe { sys::mlxs_custom_kernels() };
    match u32::try_from(code) {
        Ok(sys::mlxs_kernels_mode::MLXS_KERNELS_OFF) => CustomKernels::Off,
        Ok(sys::mlxs_kernels_mode::MLXS_KERNELS_ALWAYS) => CustomKernels::Always,
        _ => CustomKernels::Auto,
    }
}
