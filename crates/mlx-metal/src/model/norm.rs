// SPDX-License-Identifier: EUPL-1.2
//! The RMS norm and the residual stream around it: a block's residual sums
//! made with the norm after them ([`add_norm`], [`norm_add`]: one kernel on
//! CUDA), and the states one block hands the next with its last sum pending
//! ([`Hidden`]), for the next sublayer to make with its norm and, on CUDA, its
//! first projection ([`super::layers::Attention::forward_after`],
//! [`super::layers::Mlp::forward_after`]).

use mlx::{Array, Error, Result, fast, ops};

use super::weights::WeightPath;

/// RMS norm: `x / rms(x) · w`.
pub struct RmsNorm {
    pub(super) weight: Array,
    pub(super) eps: f32,
}

impl RmsNorm {
    /// The norm `w` of width `dim`.
    pub fn load(w: &WeightPath<'_>, dim: i32, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: w.tensor("weight", &[dim])?, eps: eps as f32 })
    }

    /// Gemma's norm, which multiplies by `1 + w` (precomputed once, in the
    /// weight's dtype).
    pub fn load_plus_one(w: &WeightPath<'_>, dim: i32, eps: f64) -> Result<RmsNorm> {
        let raw = w.tensor("weight", &[dim])?;
        Ok(RmsNorm { weight: ops::add_scalar(&raw, 1.0)?, eps: eps as f32 })
    }

    /// Normalises the last axis of `x`.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        fast::rms_norm(x, Some(&self.weight), self.eps)
    }
}

/// `x + r` and `norm(x + r)`: a block's residual sum and the norm after it
/// (Llama's post-attention norm), as one kernel on CUDA
/// ([`fast::fused_norm_add`]; MLX's add and norm elsewhere).
pub fn add_norm(x: &Array, r: &Array, norm: &RmsNorm) -> Result<(Array, Array)> {
    let (h, y) = fast::fused_norm_add(x, r, None, Some(&norm.weight), norm.eps)?;
    Ok((h, y.ok_or_else(|| Error::invalid("add_norm", "the fused norm returned no norm"))?))
}

/// `x + r_norm(r)` and, with `next`, `next(x + r_norm(r))`: Gemma's norm of a
/// sublayer's output, the residual sum and the norm after it, as one kernel on
/// CUDA ([`fast::fused_norm_add`]; MLX's ops elsewhere, and where the two
/// norms' epsilons differ).
pub fn norm_add(x: &Array, r: &Array, r_norm: &RmsNorm, next: Option<&RmsNorm>) -> Result<(Array, Option<Array>)> {
    match next {
        Some(n) if n.eps != r_norm.eps => {
            let h = ops::add(x, &r_norm.forward(r)?)?;
            let y = n.forward(&h)?;
            Ok((h, Some(y)))
        }
        _ => fast::fused_norm_add(x, r, Some(&r_norm.weight), next.map(|n| &n.weight), r_norm.eps),
    }
}

/// Hidden states between blocks, as one block hands them to the next.
pub enum Hidden<'a> {
    /// The states, summed.
    Ready(Array),
    /// The states not yet summed: `x + r`, or `x + r_norm(r)` (Gemma's norm of
    /// a sublayer's output). The next block adds them up with its input norm,
    /// and on CUDA, for a decode step of one sequence, with its first
    /// projection too (one kernel: [`super::layers::Attention::forward_after`]).
    Pending {
        /// The residual stream.
        x: Array,
        /// The last sublayer's output.
        r: Array,
        /// Its norm, when the architecture norms it before the sum.
        r_norm: Option<&'a RmsNorm>,
    },
}

impl Hidden<'_> {
    /// The states summed.
    pub fn into_sum(self) -> Result<Array> {
        match self {
            Hidden::Ready(x) => Ok(x),
            Hidden::Pending { x, r, r_norm } => Ok(sum_norm(&x, &r, r_norm, None)?.0),
        }
    }

    /// The states summed and `norm` of them, as the kernels of the fused path
    /// make them ([`add_norm`], [`norm_add`]).
    pub fn sum_and_norm(self, norm: &RmsNorm) -> Result<(Array, Array)> {
        match self {
            Hidden::Ready(x) => {
                let normed = norm.forward(&x)?;
                Ok((x, normed))
            }
            Hidden::Pending { x, r, r_norm } => {
                let (h, y) = sum_norm(&x, &r, r_norm, Some(norm))?;
                Ok((h, y.ok_or_else(|| Error::invalid("sum_and_norm", "the fused norm returned no norm"))?))
            }
        }
    }
}

/// `x + r_norm(r)` (`x + r` without `r_norm`) and, with `next`, its norm:
/// [`norm_add`] or [`add_norm`].
fn sum_norm(x: &Array, r: &Array, r_norm: Option<&RmsNorm>, next: Option<&RmsNorm>) -> Result<(Array, Option<Array>)> {
    match (r_norm, next) {
        (Some(rn), next) => norm_add(x, r, rn, next),
        (None, Some(next)) => add_norm(x, r, next).map(|(h, y)| (h, Some(y))),
        (None, None) => Ok((ops::add(x, r)?, None)),
    }
}
