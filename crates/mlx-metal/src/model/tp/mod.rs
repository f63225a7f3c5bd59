// SPDX-License-Identifier: EUPL-1.2
//! Tensor parallelism in the models, as mlx-lm's `model.shard()` lays it out:
//! in each block q/k/v and gate/up are column-parallel (each rank computes
//! its heads and its slice of the MLP), o_proj and down_proj row-parallel,
//! followed by one `all_sum` each. Norms are replicated.
//!
//! The embedding and the output head are vocabulary-parallel ([`Vocab`]):
//! rank `r` holds the rows `[r·V/N, (r+1)·V/N)` of the embedding table and
//! of an untied head (contiguous, uneven by at most one row when `V` does not
//! divide). A lookup zeroes the ids outside the rank's rows and sums the
//! ranks' embeddings (one `all_sum`, exact: every position has one non-zero
//! term); the head computes the rank's logits and gathers them (one
//! `all_gather`, each rank's slice padded to the longest), so every rank ends
//! with the same full logits. [`VocabLayout::Replicated`] keeps both tables
//! whole on every rank instead.
//!
//! Heads are split along key/value groups so that a rank's query heads find
//! their key/value heads on the same rank: with at least as many key/value
//! heads as ranks each rank takes a contiguous run of groups (uneven when
//! they do not divide, e.g. SmolLM2's 3 over 2 ranks); with fewer, the ranks
//! sharing a key/value head each hold a copy of it and an even part of its
//! query heads (Gemma 3's single key/value head).

mod options;

pub use options::{Shard, TensorParallel, TensorParallelOptions, VocabLayout};

use crate::nn::Embedding;
use mlx::ops;
use mlx::{Array, Dtype};
use mlx::{Error, Result};

use crate::model::weights::Split;

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

/// Each rank's rows `(start, len)` of a vocabulary of `vocab` over `ranks`
/// ranks: contiguous, in rank order, lengths differing by at most one.
pub fn vocab_ranges(vocab: i32, ranks: i32) -> Result<Vec<(i32, i32)>> {
    (0..ranks).map(|r| Shard::new(r, ranks).and_then(|s| s.range(vocab, "vocab_size"))).collect()
}

/// A vocabulary-parallel embedding and head (see the module docs), or the
/// whole vocabulary on one rank.
#[derive(Debug, Clone)]
pub struct Vocab {
    /// The group, when the vocabulary is sharded over more than one rank.
    tp: Option<TensorParallel>,
    /// The whole vocabulary.
    size: i32,
    /// This rank's first row.
    start: i32,
    /// This rank's rows.
    len: i32,
    /// The longest rank's rows (what every rank pads its logits to).
    padded: i32,
    /// The columns of the gathered, padded logits that are real, in
    /// vocabulary order (`None` when no rank pads).
    columns: Option<Array>,
}

impl Vocab {
    /// The vocabulary of `size` rows as `tp` holds it: sharded when there
    /// are several ranks and the layout is [`VocabLayout::Sharded`], whole
    /// otherwise.
    pub fn new(size: i32, tp: Option<&TensorParallel>) -> Result<Vocab> {
        let whole = Vocab { tp: None, size, start: 0, len: size, padded: size, columns: None };
        let Some(tp) = tp.filter(|t| t.shard().size > 1 && t.vocab_layout() == VocabLayout::Sharded) else {
            return Ok(whole);
        };
        let s = tp.shard();
        let ranges = vocab_ranges(size, s.size)?;
        let (start, len) = ranges
            .get(s.rank as usize)
            .copied()
            .ok_or_else(|| Error::invalid("shard", format!("rank {} has no vocabulary rows", s.rank)))?;
        let padded = ranges.iter().map(|r| r.1).max().unwrap_or(len);
        let columns = if ranges.iter().all(|r| r.1 == padded) {
            None
        } else {
            let cols: Vec<i32> =
                ranges.iter().enumerate().flat_map(|(r, &(_, n))| (0..n).map(move |i| r as i32 * padded + i)).collect();
            Some(Array::from_slice(&cols, &[size])?)
        };
        Ok(Vocab { tp: Some(tp.clone()), size, start, len, padded, columns })
    }

    /// The rows this rank holds, as a split of an `[vocab, hidden]` table.
    pub fn split(&self) -> Split {
        Split::Output { start: self.start, len: self.len }
    }

    /// This rank's rows `(start, len)`.
    pub fn rows(&self) -> (i32, i32) {
        (self.start, self.len)
    }

    /// Whether the vocabulary is sharded over several ranks.
    pub fn is_sharded(&self) -> bool {
        self.tp.is_some()
    }

    /// Looks `ids` up in `table` (this rank's rows): ids outside them give
    /// zeros, and the sum over the ranks gives every rank the full
    /// embeddings `[..., hidden]`, exactly as the whole table would.
    pub fn embed(&self, table: &Embedding, ids: &Array) -> Result<Array> {
        let Some(tp) = &self.tp else { return table.forward(ids) };
        let lo = Array::scalar_as(f64::from(self.start), ids.dtype())?;
        let hi = Array::scalar_as(f64::from(self.start + self.len), ids.dtype())?;
        let mine = ops::logical_and(&ops::greater_equal(ids, &lo)?, &ops::less(ids, &hi)?)?;
        let local = ops::where_(&mine, &ops::subtract(ids, &lo)?, &Array::scalar_as(0.0, ids.dtype())?)?;
        let rows = table.forward(&local)?;
        let zero = Array::scalar_as(0.0, rows.dtype())?;
        let rows = ops::where_(&ops::expand_dims(&mine, &[-1])?, &rows, &zero)?;
        tp.all_sum(&rows)
    }

    /// This rank's logits `[..., len]` gathered into the full `[..., vocab]`
    /// in vocabulary order, the same on every rank.
    pub fn gather(&self, logits: &Array) -> Result<Array> {
        let Some(tp) = &self.tp else { return Ok(logits.clone()) };
        let shape = logits.shape();
        let n = shape.len();
        if n == 0 || shape[n - 1] != self.len {
            return Err(Error::invalid(
                "vocab_gather",
                format!("this rank's logits {shape:?} do not end in its {} vocabulary rows", self.len),
            ));
        }
        let x = if self.len < self.padded {
            let zero = Array::scalar_as(0.0, logits.dtype())?;
            ops::pad(logits, &[n as i32 - 1], &[0], &[self.padded - self.len], &zero)?
        } else {
            logits.clone()
        };
        // all_gather stacks along axis 0: [N, ..., padded] → [..., N, padded].
        let all = tp.all_gather(&ops::expand_dims(&x, &[0])?)?;
        let order: Vec<i32> = (1..n as i32).chain([0, n as i32]).collect();
        let moved = ops::transpose(&all, &order)?;
        let mut out_shape = shape;
        out_shape[n - 1] = -1;
        let full = ops::reshape(&moved, &out_shape)?;
        match &self.columns {
            Some(c) => ops::take(&full, c, -1),
            None => Ok(full),
        }
    }

    /// The whole vocabulary's size.
    pub fn size(&self) -> i32 {
        self.size
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
    fn vocab_ranges_are_contiguous_and_uneven_by_at_most_one_row() {
        assert_eq!(vocab_ranges(512, 2).ok(), Some(vec![(0, 256), (256, 256)]));
        assert_eq!(vocab_ranges(389, 2).ok(), Some(vec![(0, 194), (194, 195)]));
        assert_eq!(vocab_ranges(10, 4).ok(), Some(vec![(0, 2), (2, 3), (5, 2), (7, 3)]));
        assert_eq!(vocab_ranges(262_144, 1).ok(), Some(vec![(0, 262_144)]));
        let e = vocab_ranges(3, 4).expect_err("fewer rows than ranks");
        assert!(e.to_string().contains("vocab_size = 3 cannot be split over 4 tensor-parallel ranks"), "{e}");
    }

    #[test]
    fn without_tensor_parallelism_the_vocabulary_is_whole() {
        let v = Vocab::new(389, None).expect("a vocabulary");
        assert!(!v.is_sharded());
        assert_eq!((v.rows(), v.size(), v.split()), ((0, 389), 389, Split::Output { start: 0, len: 389 }));
        let logits = ops::zeros(&[1, 2, 389], Dtype::Float32).expect("logits");
        assert_eq!(v.gather(&logits).map(|l| l.shape()).ok(), Some(vec![1, 2, 389]));
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
