// SPDX-License-Identifier: EUPL-1.2
//! The LoRA layer: a low-rank update that rides on an [`nn::Linear`](super::Linear)
//! and adds `scale · (dropout(x) A) B` to its output, with `A: [in, r]` and
//! `B: [r, out]`, as mlx-lm's `LoRALinear` does (the update is computed in the
//! adapter's dtype and cast to the input's before it is added). The base layer
//! may be dense or quantised (QLoRA); it is never changed. Attaching adapters
//! to a model and adapter files are [`crate::lora`]'s.

use mlx::{Array, Dtype, Error, Result, ops, random};

/// The low-rank update attached to a linear layer.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// `[in, r]`.
    pub a: Array,
    /// `[r, out]`.
    pub b: Array,
    /// The factor applied to the update.
    pub scale: f32,
    /// Dropout probability on the adapter's input, applied only while `training`.
    pub dropout: f32,
    /// Whether dropout is active.
    pub training: bool,
}

impl LoraLayer {
    /// An update with `a: [in, r]` and `b: [r, out]`; the shapes are checked
    /// against each other.
    pub fn new(a: Array, b: Array, scale: f32, dropout: f32) -> Result<LoraLayer> {
        let (sa, sb) = (a.shape(), b.shape());
        if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] {
            return Err(Error::invalid(
                "lora",
                format!("lora_a must be [in, r] and lora_b [r, out], got {sa:?} and {sb:?}"),
            ));
        }
        if !scale.is_finite() {
            return Err(Error::invalid("lora", format!("scale {scale} is not finite")));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::invalid("lora", format!("dropout {dropout} is not in [0, 1)")));
        }
        Ok(LoraLayer { a, b, scale, dropout, training: false })
    }

    /// The rank `r`.
    pub fn rank(&self) -> i32 {
        self.a.shape().get(1).copied().unwrap_or(0)
    }

    /// `y + (scale · (dropout(x) A) B)` cast to `x`'s dtype (mlx-lm's order).
    pub fn apply(&self, x: &Array, y: &Array) -> Result<Array> {
        let dropped;
        let input = if self.training && self.dropout > 0.0 {
            let keep = 1.0 - f64::from(self.dropout);
            let mask = random::bernoulli(&Array::scalar_as(keep, Dtype::Float32)?, &x.shape(), None)?;
            dropped = ops::multiply_scalar(&ops::multiply(&ops::astype(&mask, x.dtype())?, x)?, 1.0 / keep)?;
            &dropped
        } else {
            x
        };
        let z = ops::matmul(&ops::matmul(input, &self.a)?, &self.b)?;
        let z = ops::multiply_scalar(&z, f64::from(self.scale))?;
        ops::add(y, &ops::astype(&z, x.dtype())?)
    }

    /// `scale · Bᵀ Aᵀ`, the `[out, in]` change to the base weight, in `dtype`.
    pub fn delta(&self, dtype: Dtype) -> Result<Array> {
        let bt = ops::multiply_scalar(&ops::transpose(&self.b, &[1, 0])?, f64::from(self.scale))?;
        ops::astype(&ops::matmul(&bt, &ops::transpose(&self.a, &[1, 0])?)?, dtype)
    }
}
