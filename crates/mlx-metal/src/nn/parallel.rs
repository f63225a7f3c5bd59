// SPDX-License-Identifier: EUPL-1.2
//! The collectives that end a layer split over the ranks of a tensor-parallel
//! model. `model::tp` sets them when it shards a built model (as mlx-lm's
//! `shard()` swaps in its sharded linears); a model's own code never sees them.
//!
//! - A row-parallel linear layer (o_proj, down_proj: each rank holds some
//!   input columns) ends with [`AllSum`]: the partial outputs summed over the
//!   ranks.
//! - A vocabulary-parallel embedding or head (each rank holds a contiguous run
//!   of the vocabulary's rows, [`VocabShard`]): a lookup zeroes the ids outside
//!   the rank's rows and sums the ranks' embeddings (one `all_sum`, exact:
//!   every position has one non-zero term); the head computes the rank's logits
//!   and gathers them (one `all_gather`, each rank's slice padded to the
//!   longest), so every rank ends with the same full logits.
//!
//! Column-parallel layers (q/k/v, gate/up) need nothing: each rank computes
//! its own heads or slice of the MLP.

use std::fmt;
use std::rc::Rc;

use mlx::distributed::{self, Group};
use mlx::{Array, Dtype, Error, Result, ops};

/// What follows a linear layer's matmul.
#[derive(Debug, Clone, Default)]
pub enum Parallel {
    /// Nothing: the layer is whole, or column-parallel.
    #[default]
    None,
    /// Row-parallel: the outputs are summed over the ranks.
    Sum(AllSum),
    /// A vocabulary-parallel head: the ranks' logits are gathered.
    Gather(VocabShard),
}

impl Parallel {
    /// Whether nothing follows the matmul.
    pub fn is_none(&self) -> bool {
        matches!(self, Parallel::None)
    }

    /// The layer's output after its collective.
    pub fn finish(&self, y: Array) -> Result<Array> {
        match self {
            Parallel::None => Ok(y),
            Parallel::Sum(sum) => sum.apply(&y),
            Parallel::Gather(vocab) => vocab.gather(&y),
        }
    }
}

/// The sum over the ranks that ends a row-parallel layer.
#[derive(Clone)]
pub struct AllSum(Rc<Group>);

impl fmt::Debug for AllSum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AllSum(over {} ranks)", self.0.size())
    }
}

impl AllSum {
    /// The sum over every rank of `group`.
    pub fn new(group: Rc<Group>) -> AllSum {
        AllSum(group)
    }

    /// `x` summed over the ranks. Half-precision partial sums are added in
    /// float32 and rounded once, closer to the single-process matmul, which
    /// accumulates in float32 and rounds once.
    pub fn apply(&self, x: &Array) -> Result<Array> {
        if self.0.size() == 1 {
            return Ok(x.clone());
        }
        match x.dtype() {
            d @ (Dtype::Bfloat16 | Dtype::Float16) => {
                ops::astype(&distributed::all_sum(&ops::astype(x, Dtype::Float32)?, &self.0)?, d)
            }
            _ => distributed::all_sum(x, &self.0),
        }
    }
}

/// This rank's rows `[start, start + len)` of a vocabulary-parallel table of
/// `size` rows.
#[derive(Clone)]
pub struct VocabShard {
    group: Rc<Group>,
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

impl fmt::Debug for VocabShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VocabShard(rows {}..{} of {})", self.start, self.start + self.len, self.size)
    }
}

impl VocabShard {
    /// The rows of rank `group.rank()`, when the ranks hold `ranges[r] =
    /// (start, len)` of a vocabulary of `size` rows (contiguous, in rank
    /// order).
    ///
    /// # Errors
    /// The ranges do not cover the vocabulary in rank order, or there is no
    /// range for this rank.
    pub fn new(group: Rc<Group>, size: i32, ranges: &[(i32, i32)]) -> Result<VocabShard> {
        const OP: &str = "vocab_shard";
        let rank = group.rank();
        if ranges.len() != group.size() as usize {
            return Err(Error::invalid(OP, format!("{} row ranges for {} ranks", ranges.len(), group.size())));
        }
        let mut next = 0;
        for &(start, len) in ranges {
            if start != next || len <= 0 {
                return Err(Error::invalid(OP, format!("row ranges {ranges:?} do not cover 0..{size} in order")));
            }
            next = start + len;
        }
        if next != size {
            return Err(Error::invalid(OP, format!("row ranges {ranges:?} do not cover 0..{size}")));
        }
        let (start, len) = ranges
            .get(rank as usize)
            .copied()
            .ok_or_else(|| Error::invalid("shard", format!("rank {rank} has no vocabulary rows")))?;
        let padded = ranges.iter().map(|r| r.1).max().unwrap_or(len);
        let columns = if ranges.iter().all(|r| r.1 == padded) {
            None
        } else {
            let cols: Vec<i32> =
                ranges.iter().enumerate().flat_map(|(r, &(_, n))| (0..n).map(move |i| r as i32 * padded + i)).collect();
            Some(Array::from_slice(&cols, &[size])?)
        };
        Ok(VocabShard { group, size, start, len, padded, columns })
    }

    /// This rank's rows `(start, len)`.
    pub fn rows(&self) -> (i32, i32) {
        (self.start, self.len)
    }

    /// The whole vocabulary's size.
    pub fn size(&self) -> i32 {
        self.size
    }

    /// Looks `ids` up with `lookup` (over this rank's rows, indexed from 0):
    /// ids outside them give zeros, and the sum over the ranks gives every
    /// rank the full embeddings `[..., hidden]`, exactly as the whole table
    /// would.
    pub fn embed(&self, ids: &Array, lookup: impl FnOnce(&Array) -> Result<Array>) -> Result<Array> {
        let lo = Array::scalar_as(f64::from(self.start), ids.dtype())?;
        let hi = Array::scalar_as(f64::from(self.start + self.len), ids.dtype())?;
        let mine = ops::logical_and(&ops::greater_equal(ids, &lo)?, &ops::less(ids, &hi)?)?;
        let local = ops::where_(&mine, &ops::subtract(ids, &lo)?, &Array::scalar_as(0.0, ids.dtype())?)?;
        let rows = lookup(&local)?;
        let zero = Array::scalar_as(0.0, rows.dtype())?;
        let rows = ops::where_(&ops::expand_dims(&mine, &[-1])?, &rows, &zero)?;
        distributed::all_sum(&rows, &self.group)
    }

    /// This rank's logits `[..., len]` gathered into the full `[..., vocab]`
    /// in vocabulary order, the same on every rank.
    pub fn gather(&self, logits: &Array) -> Result<Array> {
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
        let all = distributed::all_gather(&ops::expand_dims(&x, &[0])?, &self.group)?;
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
}
