// SPDX-License-Identifier: EUPL-1.2
//! The attention masks caches hand to the models: none, the fused causal
//! mask, or an explicit boolean mask (windowed, or hiding a batch's padding).

use mlx::ops;
use mlx::{Array, Dtype, Result};

/// The mask an attention call needs.
#[derive(Debug, Clone)]
pub enum Mask {
    /// No mask (one query attending to everything cached).
    None,
    /// The fused causal mask.
    Causal,
    /// An explicit boolean mask, `true` = attend.
    Array(Array),
}

impl Mask {
    /// The mask in the form the fused attention kernel takes.
    pub fn as_attention(&self) -> mlx::fast::AttentionMask<'_> {
        match self {
            Mask::None => mlx::fast::AttentionMask::None,
            Mask::Causal => mlx::fast::AttentionMask::Causal,
            Mask::Array(a) => mlx::fast::AttentionMask::Array(a),
        }
    }
}

/// A boolean causal mask `[n, offset + n]` for `n` new queries after `offset`
/// cached positions; with `window`, each query sees at most `window` keys.
pub fn causal_mask(n: i32, offset: i32, window: Option<i32>) -> Result<Array> {
    let rinds = ops::arange(0.0, f64::from(offset + n), 1.0, Dtype::Int32)?;
    let linds = ops::arange(f64::from(offset), f64::from(offset + n), 1.0, Dtype::Int32)?;
    let linds = ops::expand_dims(&linds, &[1])?;
    let rinds = ops::expand_dims(&rinds, &[0])?;
    let mut mask = ops::greater_equal(&linds, &rinds)?;
    if let Some(w) = window {
        let limit = ops::add(&rinds, &Array::scalar(w))?;
        mask = ops::logical_and(&mask, &ops::less(&linds, &limit)?)?;
    }
    Ok(mask)
}
