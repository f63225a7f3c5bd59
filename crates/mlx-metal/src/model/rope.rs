// SPDX-License-Identifier: EUPL-1.2
//! The rope factory: plain, linearly scaled, and Llama 3 scaled rotary
//! position embeddings, built as mlx-lm's `initialize_rope` builds them.

use std::path::Path;

use crate::cache::Offset;
use mlx::Result;
use mlx::fast::{self, RopeFreqs, RopeOffset, Rotation};
use mlx::ops;
use mlx::{Array, Dtype};

use super::config::RopeScaling;
use super::weights::model_err;

/// A rotary position embedding over the first `dims` features.
#[derive(Debug, Clone)]
pub enum Rope {
    /// `base^(-2i/dims)`, positions multiplied by `scale`.
    Standard {
        /// Rotated features.
        dims: i32,
        /// Frequency base.
        base: f32,
        /// Position scale (1 / factor for linear scaling).
        scale: f32,
        /// Rotate adjacent pairs instead of halves.
        traditional: bool,
    },
    /// Explicit frequencies (Llama 3 scaling).
    Custom {
        /// Rotated features.
        dims: i32,
        /// `dims / 2` frequencies; positions are divided by them.
        freqs: Array,
        /// Rotate adjacent pairs instead of halves.
        traditional: bool,
    },
}

impl Rope {
    /// Builds the rope a config asks for; `path` is for error messages.
    pub fn new(dims: i32, base: f64, traditional: bool, scaling: Option<&RopeScaling>, path: &Path) -> Result<Rope> {
        let kind = scaling.and_then(|s| s.rope_type.as_deref()).unwrap_or("default");
        match (kind, scaling) {
            ("default", _) | (_, None) => Ok(Rope::Standard { dims, base: base as f32, scale: 1.0, traditional }),
            ("linear", Some(s)) => {
                let factor = s.factor.ok_or_else(|| model_err(path, "linear rope_scaling needs a factor"))?;
                Ok(Rope::Standard { dims, base: base as f32, scale: (1.0 / factor) as f32, traditional })
            }
            ("llama3", Some(s)) => Ok(Rope::Custom { dims, freqs: llama3_freqs(dims, base, s, path)?, traditional }),
            (other, _) => Err(model_err(path, format!("rope_scaling type {other:?} is not supported"))),
        }
    }

    /// Applies the rope to `x: [B, H, L, D]` for positions `offset..offset + L`
    /// (one offset for every row, or one per row of a batch).
    pub fn apply(&self, x: &Array, offset: &Offset) -> Result<Array> {
        let r = self.rotation(offset);
        fast::rope(x, r.dims, r.traditional, r.freqs, r.scale, r.offset)
    }

    /// The q and k heads of a fused q/k/v projection's output `y: [B, L, N]`
    /// (its first `heads` heads of `head_dim` features), normed with
    /// `norm`'s weight `[heads, 1, head_dim]` and eps when given, then
    /// rotated as [`Rope::apply`] rotates: `[B, heads, L, head_dim]`, one
    /// kernel on CUDA ([`fast::qk_norm_rope`]).
    pub fn norm_and_apply(
        &self,
        y: &Array,
        heads: i32,
        head_dim: i32,
        norm: Option<(&Array, f32)>,
        offset: &Offset,
    ) -> Result<Array> {
        fast::qk_norm_rope(y, heads, head_dim, norm, &self.rotation(offset))
    }

    /// How [`Rope::apply`] rotates at `offset`, as [`fast`] takes it.
    pub(super) fn rotation<'a>(&'a self, offset: &'a Offset) -> Rotation<'a> {
        let offset = match offset {
            Offset::Fixed(o) => RopeOffset::Fixed(*o),
            Offset::PerRow(a) => RopeOffset::Array(a),
        };
        match self {
            Rope::Standard { dims, base, scale, traditional } => Rotation {
                dims: *dims,
                traditional: *traditional,
                freqs: RopeFreqs::Base(*base),
                scale: *scale,
                offset,
            },
            Rope::Custom { dims, freqs, traditional } => {
                Rotation { dims: *dims, traditional: *traditional, freqs: RopeFreqs::Custom(freqs), scale: 1.0, offset }
            }
        }
    }
}

/// Llama 3 frequencies, computed with the same float32 ops as mlx-lm.
fn llama3_freqs(dims: i32, base: f64, s: &RopeScaling, path: &Path) -> Result<Array> {
    let factor = s.factor.ok_or_else(|| model_err(path, "llama3 rope_scaling needs a factor"))?;
    let low = s.low_freq_factor.unwrap_or(1.0);
    let high = s.high_freq_factor.unwrap_or(4.0);
    let old_ctx = s.original_max_position_embeddings.unwrap_or(8192.0);
    if high == low {
        return Err(model_err(path, "llama3 rope_scaling needs high_freq_factor != low_freq_factor"));
    }
    let f32s = |v: f64| Array::scalar_as(v, Dtype::Float32);
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    // freqs = base ** (arange(0, dims, 2) / dims)
    let idx = ops::arange(0.0, f64::from(dims), 2.0, Dtype::Int32)?;
    let exponent = ops::divide(&idx, &f32s(f64::from(dims))?)?;
    let freqs = ops::power(&f32s(base)?, &exponent)?;
    let wavelens = ops::multiply(&f32s(2.0 * std::f64::consts::PI)?, &freqs)?;
    let freqs =
        ops::where_(&ops::greater(&wavelens, &f32s(low_wavelen)?)?, &ops::multiply(&freqs, &f32s(factor)?)?, &freqs)?;
    let is_medium =
        ops::logical_and(&ops::greater(&wavelens, &f32s(high_wavelen)?)?, &ops::less(&wavelens, &f32s(low_wavelen)?)?)?;
    // smooth = (old_ctx / wavelens - low) / (high - low)
    let smooth =
        ops::divide(&ops::subtract(&ops::divide(&f32s(old_ctx)?, &wavelens)?, &f32s(low)?)?, &f32s(high - low)?)?;
    // smooth_freqs = freqs / ((1 - smooth) / factor + smooth)
    let denom = ops::add(&ops::divide(&ops::subtract(&f32s(1.0)?, &smooth)?, &f32s(factor)?)?, &smooth)?;
    let smooth_freqs = ops::divide(&freqs, &denom)?;
    ops::where_(&is_medium, &smooth_freqs, &freqs)
}
