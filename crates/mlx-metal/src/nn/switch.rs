// SPDX-License-Identifier: EUPL-1.2
//! Banks of linear layers applied by expert index (mixture-of-experts).

use mlx::ops;
use mlx::{Array, Result};

use super::LinearWeight;

/// A bank of linear layers (mixture-of-experts experts), weights
/// `[experts, out, in]`, applied by expert index with a gathered matmul.
#[derive(Debug, Clone)]
pub struct SwitchLinear {
    /// The stacked weights, dense or quantised.
    pub weight: LinearWeight,
    /// Optional per-expert bias `[experts, out]`.
    pub bias: Option<Array>,
}

impl SwitchLinear {
    /// Applies expert `indices[...]` to `x: [..., 1, in]` (one row per selected
    /// expert, as mlx-lm's `SwitchGLU` lays it out), giving `[..., 1, out]`.
    pub fn forward(&self, x: &Array, indices: &Array, sorted_indices: bool) -> Result<Array> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => {
                let wt = ops::swapaxes(w, -1, -2)?;
                ops::gather_mm(x, &wt, None, Some(indices), sorted_indices)?
            }
            LinearWeight::Quantized(q) => ops::gather_qmm(x, q, None, Some(indices), true, sorted_indices)?,
        };
        match &self.bias {
            Some(b) => ops::add(&y, &ops::expand_dims(&ops::take(b, indices, 0)?, &[-2])?),
            None => Ok(y),
        }
    }
}
