// SPDX-License-Identifier: EUPL-1.2
//! Cross-entropy as MLX's `nn.losses.cross_entropy` computes it, and mlx-lm's
//! `default_loss`: the mean over the unmasked target tokens.

use mlx_metal::Result;

use mlx::{Array, Dtype, ops};

/// Per-position cross-entropy of `logits: [..., V]` against integer
/// `targets: [...]`, in the logits' dtype (MLX's reference path: logits
/// shifted by their stop-gradient maximum, then `logsumexp - score`).
pub fn cross_entropy(logits: &Array, targets: &Array) -> Result<Array> {
    let shifted = ops::subtract(logits, &ops::stop_gradient(&ops::max(logits, &[-1], true)?)?)?;
    let idx = ops::expand_dims(&ops::astype(targets, Dtype::Int32)?, &[-1])?;
    let score = ops::squeeze(&ops::take_along_axis(&shifted, &idx, -1)?, &[-1])?;
    ops::subtract(&ops::logsumexp(&shifted, &[-1], false)?, &score)
}

/// The mask of target positions that count, from `lengths: [B, 2]` holding
/// `(offset, length)` per row, for `t` target positions: position `i` counts
/// when `offset <= i + 1 <= length` (mlx-lm's `default_loss`, which also
/// counts the first target after the sequence, a padding token).
pub fn target_mask(lengths: &Array, t: i32) -> Result<Array> {
    let steps = ops::arange(1.0, f64::from(t) + 1.0, 1.0, Dtype::Int32)?;
    let offsets = ops::slice(lengths, &[0, 0], &[lengths.dim(0)?, 1])?;
    let ends = ops::slice(lengths, &[0, 1], &[lengths.dim(0)?, 2])?;
    ops::logical_and(&ops::greater_equal(&steps, &offsets)?, &ops::less_equal(&steps, &ends)?)
}

/// mlx-lm's `default_loss` given the logits of `batch[:, :-1]`: the masked
/// cross-entropy against `batch[:, 1:]`, summed in float32 and divided by the
/// number of counted tokens. Returns `(loss, ntoks)` as lazy scalars.
pub fn masked_loss(logits: &Array, targets: &Array, lengths: &Array) -> Result<(Array, Array)> {
    let mask = target_mask(lengths, targets.dim(1)?)?;
    let ce = ops::multiply(&cross_entropy(logits, targets)?, &mask)?;
    let ntoks = ops::sum_all(&mask, false)?;
    let total = ops::sum_all(&ops::astype(&ce, Dtype::Float32)?, false)?;
    Ok((ops::divide(&total, &ntoks)?, ntoks))
}

/// Splits a padded batch `[B, L]` into inputs `[:, :-1]` and targets `[:, 1:]`.
pub fn shift(batch: &Array) -> Result<(Array, Array)> {
    let (b, l) = (batch.dim(0)?, batch.dim(1)?);
    Ok((ops::slice(batch, &[0, 0], &[b, l - 1])?, ops::slice(batch, &[0, 1], &[b, l])?))
}
