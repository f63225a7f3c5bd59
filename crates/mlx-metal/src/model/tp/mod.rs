// SPDX-License-Identifier: EUPL-1.2
//! Tensor parallelism, applied to a built model as mlx-lm's `model.shard()`
//! does ([`shard`]): in each block q/k/v and gate/up become column-parallel
//! (each rank holds its heads and its slice of the MLP), o_proj and down_proj
//! row-parallel, each ending with one `all_sum` ([`crate::nn::AllSum`]).
//! Norms are replicated. The models' own code knows nothing of it: their
//! attention and MLP read like the single-device model, and [`shard`] works on
//! the pieces every architecture lends ([`super::LanguageModel::parts_mut`]),
//! reading each rank's slices straight from the checkpoint's files.
//!
//! The embedding and the output head are vocabulary-parallel ([`crate::nn::VocabShard`]):
//! rank `r` holds the rows `[r·V/N, (r+1)·V/N)` of the embedding table and
//! of an untied head (contiguous, uneven by at most one row when `V` does not
//! divide). A lookup zeroes the ids outside the rank's rows and sums the
//! ranks' embeddings (one `all_sum`, exact: every position has one non-zero
//! term); the head computes the rank's logits and gathers them (one
//! `all_gather`, each rank's slice padded to the longest), so every rank ends
//! with the same full logits ([`crate::nn::VocabShard`]).
//! [`VocabLayout::Replicated`] keeps both tables whole on every rank instead.
//!
//! Heads are split along key/value groups so that a rank's query heads find
//! their key/value heads on the same rank: with at least as many key/value
//! heads as ranks each rank takes a contiguous run of groups (uneven when
//! they do not divide, e.g. SmolLM2's 3 over 2 ranks); with fewer, the ranks
//! sharing a key/value head each hold a copy of it and an even part of its
//! query heads (Gemma 3's single key/value head).

mod options;

pub use options::{DEFAULT_STEP_TIMEOUT, Shard, TensorParallel, TensorParallelOptions, VocabLayout};

use std::rc::Rc;

use mlx::{Error, Result};

use super::LanguageModel;
use super::weights::{Split, Weights, model_err};
use crate::nn::{AllSum, Linear, Parallel, VocabShard};

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

/// Each rank's rows `(start, len)` of a vocabulary of `vocab` over `ranks`
/// ranks: contiguous, in rank order, lengths differing by at most one.
pub fn vocab_ranges(vocab: i32, ranks: i32) -> Result<Vec<(i32, i32)>> {
    (0..ranks).map(|r| Shard::new(r, ranks).and_then(|s| s.range(vocab, "vocab_size"))).collect()
}

/// The rows each rank holds of a vocabulary of `size` rows, or `None` when the
/// tables stay whole: one rank, or [`VocabLayout::Replicated`].
pub fn vocab_plan(size: i32, shard: Shard, layout: VocabLayout) -> Result<Option<Vec<(i32, i32)>>> {
    if shard.size <= 1 || layout == VocabLayout::Replicated {
        return Ok(None);
    }
    vocab_ranges(size, shard.size).map(Some)
}

/// Splits a built model over the ranks of `tp`, as mlx-lm's `shard()`: every
/// block's q/k/v and gate/up keep this rank's output rows, o_proj and
/// down_proj this rank's input columns followed by a sum over the ranks, the
/// attention its heads; the embedding and the head keep this rank's
/// vocabulary rows unless the layout is replicated. The slices are read from
/// `weights`' files (loaded with [`Weights::load_sliceable`]); the whole
/// tensors the model was built with are dropped unread.
///
/// # Errors
/// The model's heads, MLP or vocabulary cannot be split over this many ranks,
/// or a slice cannot be read.
pub fn shard(model: &mut dyn LanguageModel, weights: &Weights, tp: &TensorParallel) -> Result<()> {
    let s = tp.shard();
    if s.size <= 1 {
        return Ok(());
    }
    let dir = weights.dir();
    let split_err = |e: Error| model_err(dir, e.to_string());
    let group = tp.group_rc();
    let parts = model.parts_mut();
    for (i, block) in parts.layers.into_iter().enumerate() {
        let (a, m) = (block.self_attn, block.mlp);
        (a.qkv, m.gate_up) = (None, None);
        let p = format!("model.layers.{i}");
        let head_dim = a.q_proj.features()?.0 / a.n_heads.max(1);
        let heads = Heads::of(a.n_heads, a.n_kv_heads, Some(s)).map_err(split_err)?;
        let attn = format!("{p}.self_attn");
        a.q_proj = slice(weights, &format!("{attn}.q_proj"), &a.q_proj, heads.q(head_dim))?;
        a.k_proj = slice(weights, &format!("{attn}.k_proj"), &a.k_proj, heads.kv(head_dim))?;
        a.v_proj = slice(weights, &format!("{attn}.v_proj"), &a.v_proj, heads.kv(head_dim))?;
        a.o_proj = summed(slice(weights, &format!("{attn}.o_proj"), &a.o_proj, heads.o(head_dim, Some(s)))?, &group);
        (a.n_heads, a.n_kv_heads) = (heads.q_len, heads.kv_len);
        let (cols, rows) = mlp(m.gate_proj.features()?.0, Some(s)).map_err(split_err)?;
        m.gate_proj = slice(weights, &format!("{p}.mlp.gate_proj"), &m.gate_proj, cols)?;
        m.up_proj = slice(weights, &format!("{p}.mlp.up_proj"), &m.up_proj, cols)?;
        m.down_proj = summed(slice(weights, &format!("{p}.mlp.down_proj"), &m.down_proj, rows)?, &group);
    }
    let (vocab, hidden) = parts.embed_tokens.weight.features()?;
    let Some(ranges) = vocab_plan(vocab, s, tp.vocab_layout()).map_err(split_err)? else { return Ok(()) };
    let rows = VocabShard::new(Rc::clone(&group), vocab, &ranges)?;
    let (start, len) = rows.rows();
    let mut table = weights.root().pp("model.embed_tokens").embedding_rows(vocab, hidden, start, len)?;
    table.vocab = Some(rows.clone());
    *parts.embed_tokens = table;
    if let Some(head) = parts.lm_head {
        let mut sliced = slice(weights, "lm_head", head, Split::Output { start, len })?;
        sliced.parallel = Parallel::Gather(rows);
        *head = sliced;
    }
    Ok(())
}

/// This rank's part of the linear layer `layer` at `path`, read from the files.
fn slice(weights: &Weights, path: &str, layer: &Linear, split: Split) -> Result<Linear> {
    let (out, inp) = layer.features()?;
    weights.root().pp(path).linear_split(out, inp, layer.bias.is_some(), split)
}

/// A row-parallel layer: its outputs are summed over the ranks.
fn summed(mut layer: Linear, group: &Rc<mlx::distributed::Group>) -> Linear {
    layer.parallel = Parallel::Sum(AllSum::new(Rc::clone(group)));
    layer
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
        let one = Shard::new(0, 1).expect("one rank");
        assert_eq!(vocab_plan(389, one, VocabLayout::Sharded).ok(), Some(None));
        let two = Shard::new(1, 2).expect("two ranks");
        assert_eq!(vocab_plan(389, two, VocabLayout::Replicated).ok(), Some(None));
        assert_eq!(vocab_plan(389, two, VocabLayout::Sharded).ok(), Some(Some(vec![(0, 194), (194, 195)])));
        assert!(vocab_plan(1, two, VocabLayout::Sharded).is_err());
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
