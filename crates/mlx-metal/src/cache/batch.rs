// SPDX-License-Identifier: EUPL-1.2
//! [`BatchKvCache`]: the cache of a left-padded batch, with per-row rope
//! offsets, masks that hide each row's padding and `filter` to drop
//! finished rows.

use mlx::ops;
use mlx::{Array, Dtype, Error, Result};

use super::{KvCache, Mask, Offset, causal_mask, slice_seq};

/// A cache for a batch of left-padded sequences of different lengths
/// (mlx-lm's `BatchKVCache`).
///
/// Row `b` starts with `left_padding[b]` padding positions. Every row keeps
/// its own positions (rope offsets count from its first real token) and its
/// masks hide the padding, so a row computes what it would compute alone.
/// Sliding-window layers use this cache too, with a windowed mask: it keeps
/// every position, which the window then hides.
#[derive(Debug, Clone)]
pub struct BatchKvCache {
    inner: KvCache,
    left_padding: Vec<i32>,
}

impl BatchKvCache {
    /// An empty cache for rows with these amounts of left padding.
    pub fn new(left_padding: Vec<i32>) -> Result<Self> {
        if left_padding.is_empty() {
            return Err(Error::invalid("batch_kv_cache", "a batch needs at least one row"));
        }
        if let Some(p) = left_padding.iter().find(|&&p| p < 0) {
            return Err(Error::invalid("batch_kv_cache", format!("left padding {p} is negative")));
        }
        Ok(BatchKvCache { inner: KvCache::new(), left_padding })
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.left_padding.len()
    }

    /// Columns written so far (padding included).
    pub fn offset(&self) -> i32 {
        self.inner.offset()
    }

    /// The padding before each row's first token.
    pub fn left_padding(&self) -> &[i32] {
        &self.left_padding
    }

    /// Each row's position of the next token, `[B]` int32.
    pub fn rope_offset(&self) -> Result<Offset> {
        let off = self.inner.offset();
        let per_row: Vec<i32> = self.left_padding.iter().map(|p| off - p).collect();
        Ok(Offset::PerRow(Array::from_vec(&per_row)?))
    }

    /// Appends `keys`/`values` (`[B, H, L, D]`) and returns everything cached.
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let rows = keys.dim(0)?;
        if rows as usize != self.rows() {
            return Err(Error::invalid(
                "batch_kv_cache_update",
                format!("the cache has {} rows but the keys have {rows}", self.rows()),
            ));
        }
        self.inner.update_and_fetch(keys, values)
    }

    /// The mask `[B, 1, n, offset + n]` for `n` new queries: causal (within
    /// `window` when given) and hiding each row's padding. A padding query
    /// sees itself, so no row of scores is entirely masked.
    pub fn make_mask(&self, n: i32, window: Option<i32>) -> Result<Mask> {
        let offset = self.inner.offset();
        if window.is_none() && self.left_padding.iter().all(|&p| p == 0) {
            return self.inner.make_mask(n, None);
        }
        let total = offset + n;
        let causal = ops::expand_dims(&causal_mask(n, offset, window)?, &[0])?;
        let rinds = ops::expand_dims(&ops::arange(0.0, f64::from(total), 1.0, Dtype::Int32)?, &[0])?;
        let pad = Array::from_slice(&self.left_padding, &[self.rows() as i32, 1])?;
        let real = ops::expand_dims(&ops::greater_equal(&rinds, &pad)?, &[1])?;
        let linds = ops::expand_dims(&ops::arange(f64::from(offset), f64::from(total), 1.0, Dtype::Int32)?, &[1])?;
        let own = ops::expand_dims(&ops::equal(&linds, &rinds)?, &[0])?;
        let mask = ops::logical_or(&ops::logical_and(&causal, &real)?, &own)?;
        Ok(Mask::Array(ops::expand_dims(&mask, &[1])?))
    }

    /// Keeps only the rows `keep` (indices into the current rows, in the
    /// order given), then drops the columns that are padding in every row.
    pub fn filter(&mut self, keep: &[usize]) -> Result<()> {
        if keep.is_empty() {
            return Err(Error::invalid("batch_kv_cache_filter", "at least one row must be kept"));
        }
        if let Some(&bad) = keep.iter().find(|&&i| i >= self.rows()) {
            return Err(Error::invalid(
                "batch_kv_cache_filter",
                format!("row {bad} is out of range for a batch of {}", self.rows()),
            ));
        }
        let left_padding: Vec<i32> = keep.iter().map(|&i| self.left_padding[i]).collect();
        let shift = left_padding.iter().copied().min().unwrap_or(0);
        let idx: Vec<i32> = keep.iter().map(|&i| i as i32).collect();
        let idx = Array::from_vec(&idx)?;
        self.inner.select(|buf| {
            let rows = ops::take(buf, &idx, 0)?;
            if shift > 0 { slice_seq(&rows, shift, rows.dim(2)?) } else { Ok(rows) }
        })?;
        self.inner.offset -= shift;
        self.left_padding = left_padding.iter().map(|p| p - shift).collect();
        Ok(())
    }

    /// Forgets the last `n` columns; returns how many.
    pub fn trim(&mut self, n: i32) -> i32 {
        self.inner.trim(n)
    }

    /// The raw buffers.
    pub fn state(&self) -> Vec<&Array> {
        self.inner.state()
    }
}
