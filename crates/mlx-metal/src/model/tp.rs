// SPDX-License-Identifier: EUPL-1.2
//! Tensor parallelism in the models, as mlx-lm's `model.shard()` lays it out:
//! in each block q/k/v and gate/up are column-parallel (each rank computes
//! its heads and its slice of the MLP), o_proj and down_proj row-parallel,
//! followed by one `all_sum` each. Norms, the embedding and the output head
//! are replicated, so every rank computes the same logits.
//!
//! Heads are split along key/value groups so that a rank's query heads find
//! their key/value heads on the same rank: with at least as many key/value
//! heads as ranks each rank takes a contiguous run of groups (uneven when
//! they do not divide, e.g. SmolLM2's 3 over 2 ranks); with fewer, the ranks
//! sharing a key/value head each hold a copy of it and an even part of its
//! query heads (Gemma 3's single key/value head).

use crate::array::{Array, Dtype};
use crate::distributed::{Shard, TensorParallel};
use crate::error::{Error, Result};
use crate::ops;

use super::weights::Split;

/// A rank's attention heads: query heads `[q_start, q_start + q_len)` and
/// key/value heads `[kv_start, kv_start + kv_len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// First query head.
    pub q_start: i32,
    /// Query heads on this rank.
    pub q_len: i32,
    /// First key/value head.
    pub kv_start: i32,
    /// Key/value heads on this rank.
    pub kv_len: i32,
}

impl Heads {
    /// The heads of `shard` out of `heads` query and `kv` key/value heads
    /// (all of them without a shard).
    pub fn of(heads: i32, kv: i32, shard: Option<Shard>) -> Result<Heads> {
        let all = Heads { q_start: 0, q_len: heads, kv_start: 0, kv_len: kv };
        let Some(s) = shard.filter(|s| s.size > 1) else { return Ok(all) };
        if heads <= 0 || kv <= 0 || heads % kv != 0 {
            return Err(Error::invalid("shard", format!("{heads} query heads do not group over {kv} key/value heads")));
        }
        let group = heads / kv;
        if kv >= s.size {
            let (kv_start, kv_len) = s.range(kv, "num_key_value_heads")?;
            return Ok(Heads { q_start: kv_start * group, q_len: kv_len * group, kv_start, kv_len });
        }
        if s.size % kv == 0 && heads % s.size == 0 {
            let q_len = heads / s.size;
            let q_start = s.rank * q_len;
            return Ok(Heads { q_start, q_len, kv_start: q_start / group, kv_len: 1 });
        }
        Err(Error::invalid(
            "shard",
            format!(
                "{heads} query heads with {kv} key/value heads cannot be split over {} tensor-parallel ranks",
                s.size
            ),
        ))
    }

    /// The column-parallel part of q_proj (`head_dim` features per head).
    pub fn q(&self, head_dim: i32) -> Split {
        Split::Output { start: self.q_start * head_dim, len: self.q_len * head_dim }
    }

    /// The column-parallel part of k_proj and v_proj.
    pub fn kv(&self, head_dim: i32) -> Split {
        Split::Output { start: self.kv_start * head_dim, len: self.kv_len * head_dim }
    }

    /// The row-parallel part of o_proj (rank 0 keeps the bias).
    pub fn o(&self, head_dim: i32, shard: Option<Shard>) -> Split {
        Split::Input {
            start: self.q_start * head_dim,
            len: self.q_len * head_dim,
            keep_bias: shard.is_none_or(|s| s.rank == 0),
        }
    }
}

/// A rank's part of an MLP of width `n`: the column-parallel split of gate
/// and up, and the row-parallel split of down.
pub fn mlp(n: i32, shard: Option<Shard>) -> Result<(Split, Split)> {
    let (start, len) = match shard {
        Some(s) => s.range(n, "intermediate_size")?,
        None => (0, n),
    };
    Ok((Split::Output { start, len }, Split::Input { start, len, keep_bias: shard.is_none_or(|s| s.rank == 0) }))
}

/// The sum over the ranks that ends a row-parallel layer (nothing without
/// tensor parallelism).
#[derive(Debug, Clone, Default)]
pub struct Reduce(Option<TensorParallel>);

impl Reduce {
    /// The reduction of `tp`.
    pub fn new(tp: Option<&TensorParallel>) -> Reduce {
        Reduce(tp.filter(|t| t.shard().size > 1).cloned())
    }

    /// `x` summed over the ranks. Half-precision partial sums are added in
    /// float32 and rounded once, closer to the single-process matmul, which
    /// accumulates in float32 and rounds once.
    pub fn apply(&self, x: Array) -> Result<Array> {
        let Some(tp) = &self.0 else { return Ok(x) };
        match x.dtype() {
            d @ (Dtype::Bfloat16 | Dtype::Float16) => ops::astype(&tp.all_sum(&ops::astype(&x, Dtype::Float32)?)?, d),
            _ => tp.all_sum(&x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(rank: i32, size: i32) -> Option<Shard> {
        Shard::new(rank, size).ok()
    }

    #[test]
    fn heads_follow_key_value_groups() {
        // Even: 4 query, 2 kv over 2.
        assert_eq!(Heads::of(4, 2, shard(1, 2)).ok(), Some(Heads { q_start: 2, q_len: 2, kv_start: 1, kv_len: 1 }));
        // Uneven: SmolLM2's 9 query, 3 kv over 2.
        assert_eq!(Heads::of(9, 3, shard(0, 2)).ok(), Some(Heads { q_start: 0, q_len: 3, kv_start: 0, kv_len: 1 }));
        assert_eq!(Heads::of(9, 3, shard(1, 2)).ok(), Some(Heads { q_start: 3, q_len: 6, kv_start: 1, kv_len: 2 }));
        // Fewer kv heads than ranks: Gemma 3's 4 query, 1 kv over 2.
        assert_eq!(Heads::of(4, 1, shard(1, 2)).ok(), Some(Heads { q_start: 2, q_len: 2, kv_start: 0, kv_len: 1 }));
        assert_eq!(Heads::of(8, 2, shard(3, 4)).ok(), Some(Heads { q_start: 6, q_len: 2, kv_start: 1, kv_len: 1 }));
        // No shard: everything.
        assert_eq!(Heads::of(4, 2, None).ok(), Some(Heads { q_start: 0, q_len: 4, kv_start: 0, kv_len: 2 }));
    }

    #[test]
    fn heads_that_cannot_split_are_an_error() {
        let e = Heads::of(6, 2, shard(0, 4)).expect_err("2 kv heads over 4 ranks with 6 query heads");
        assert!(e.to_string().contains("cannot be split over 4 tensor-parallel ranks"), "{e}");
        assert!(Heads::of(5, 2, shard(0, 2)).is_err());
    }

    #[test]
    fn mlp_splits_cover_the_width() {
        let (a, b) =
            mlp(10, shard(1, 3)).unwrap_or((Split::Output { start: -1, len: 0 }, Split::Output { start: -1, len: 0 }));
        assert_eq!(a, Split::Output { start: 3, len: 3 });
        assert_eq!(b, Split::Input { start: 3, len: 3, keep_bias: false });
        assert!(mlp(1, shard(0, 2)).is_err());
    }
}
