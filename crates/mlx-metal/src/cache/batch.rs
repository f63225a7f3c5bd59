// SPDX-License-Identifier: EUPL-1.2
//! [`BatchKvCache`]: the cache of a left-padded batch, with per-row rope
//! offsets, masks that hide each row's padding, `filter` to drop finished
//! rows, `extend` to take in new ones, and, for sliding-window layers,
//! `compact` to drop the positions no query will see again. Its buffers may
//! be quantised ([`KvQuant`]): every move works on either kind.

use mlx::ops;
use mlx::{Array, Dtype, Error, Result};

use super::kv::{self, Fetched, KvArray};
use super::{KvCache, KvQuant, Mask, Offset, causal_mask};

/// A cache for a batch of left-padded sequences of different lengths
/// (mlx-lm's `BatchKVCache`).
///
/// Row `b` starts with `left_padding[b]` padding positions. Every row keeps
/// its own positions (rope offsets count from its first real token) and its
/// masks hide the padding, so a row computes what it would compute alone.
/// Sliding-window layers use this cache too ([`windowed`](Self::windowed)),
/// with a windowed mask; [`compact`](Self::compact) drops the positions that
/// have left every row's window. A row's padding may then be negative: its
/// first positions were dropped, and its rope offset still counts them.
///
/// With [`KvQuant`] settings ([`with_quant`](Self::with_quant)) the whole
/// batch converts to quantised storage once a row's position reaches their
/// `start` (for one row: exactly when a cache of its own would), and a row
/// that joins a quantised batch is quantised as it joins.
#[derive(Debug, Clone)]
pub struct BatchKvCache {
    inner: KvCache,
    left_padding: Vec<i32>,
    window: Option<i32>,
    /// When to convert to quantised storage (sibling module `quant`).
    pub(super) quant: Option<KvQuant>,
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
        Ok(BatchKvCache { inner: KvCache::new(), left_padding, window: None, quant: None })
    }

    /// An empty cache for a sliding-window layer whose queries see at most
    /// `window` keys.
    pub fn windowed(left_padding: Vec<i32>, window: i32) -> Result<Self> {
        if window < 1 {
            return Err(Error::invalid("batch_kv_cache", format!("window {window} must be at least 1")));
        }
        Ok(BatchKvCache { window: Some(window), ..Self::new(left_padding)? })
    }

    /// A one-row cache holding `keys`/`values` (`[1, H, L, D]`): the last
    /// `L` of `position` positions (all of them for a full-attention layer;
    /// at least those of the window for a sliding-window one).
    pub fn from_row(keys: Array, values: Array, position: i32, window: Option<i32>) -> Result<Self> {
        Self::from_row_parts(KvArray::Dense(keys), KvArray::Dense(values), position, window)
    }

    /// [`from_row`](Self::from_row) for keys and values as stored (dense or
    /// quantised).
    pub fn from_row_parts(keys: KvArray, values: KvArray, position: i32, window: Option<i32>) -> Result<Self> {
        const OP: &str = "batch_kv_cache_from_row";
        if keys.dim(0)? != 1 {
            return Err(Error::invalid(OP, format!("one row, not {}", keys.dim(0)?)));
        }
        let inner = KvCache::from_parts(keys, values)?;
        let held = inner.offset();
        let enough = match window {
            None => held == position,
            Some(w) => held <= position && held >= w.min(position),
        };
        if !enough {
            return Err(Error::invalid(
                OP,
                format!("{held} positions cannot stand for {position} (window {window:?})"),
            ));
        }
        Ok(BatchKvCache { inner, left_padding: vec![held - position], window, quant: None })
    }

    /// The window of a sliding-window layer's cache.
    pub fn window(&self) -> Option<i32> {
        self.window
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

    /// Each row's position of the next token: one offset when every row is
    /// at the same position (a single row, say), else `[B]` int32.
    pub fn rope_offset(&self) -> Result<Offset> {
        let off = self.inner.offset();
        if let Some((&first, rest)) = self.left_padding.split_first()
            && rest.iter().all(|&p| p == first)
        {
            return Ok(Offset::Fixed(off - first));
        }
        let per_row: Vec<i32> = self.left_padding.iter().map(|p| off - p).collect();
        Ok(Offset::PerRow(Array::from_vec(&per_row)?))
    }

    /// Each row's position of the next token (its real length so far).
    pub fn positions(&self) -> Vec<i32> {
        let off = self.inner.offset();
        self.left_padding.iter().map(|p| off - p).collect()
    }

    /// Whether keys and values are stored quantised.
    pub fn is_quantised(&self) -> bool {
        self.inner.is_quantised()
    }

    /// The quantisation settings, if any.
    pub fn quant(&self) -> Option<KvQuant> {
        self.quant
    }

    /// Appends `keys`/`values` (`[B, H, L, D]`) and returns everything cached
    /// (dense).
    ///
    /// # Errors
    ///
    /// When the cache is quantised (use [`Self::append`]).
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        self.append(keys, values)?.into_dense()
    }

    /// Appends `keys`/`values` (`[B, H, L, D]`) and returns everything
    /// cached, as stored. With [`KvQuant`] settings, the batch is first
    /// converted to quantised storage once a row's position has reached
    /// their `start`.
    pub fn append(&mut self, keys: &Array, values: &Array) -> Result<Fetched> {
        let rows = keys.dim(0)?;
        if rows as usize != self.rows() {
            return Err(Error::invalid(
                "batch_kv_cache_update",
                format!("the cache has {} rows but the keys have {rows}", self.rows()),
            ));
        }
        if let Some(q) = self.quant
            && self.inner.offset() > 0
            && self.positions().into_iter().any(|p| p >= q.start)
        {
            self.inner.quantise(q)?;
        }
        self.inner.write(keys, values)
    }

    /// The mask `[B, 1, n, offset + n]` for `n` new queries: causal (within
    /// `window` when given) and hiding each row's padding. A padding query
    /// sees itself, so no row of scores is entirely masked.
    pub fn make_mask(&self, n: i32, window: Option<i32>) -> Result<Mask> {
        let offset = self.inner.offset();
        // Without padding, a window that hides no key yet (the last query, at
        // offset + n - 1, sees key 0) leaves the plain causal mask, or none
        // for one query: as a sequence's own cache decides
        // ([`super::RotatingKvCache::make_mask`]), and a decode step builds
        // no mask.
        let window_hides = window.is_some_and(|w| offset + n > w);
        if !window_hides && self.left_padding.iter().all(|&p| p == 0) {
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
        let shift = left_padding.iter().copied().min().unwrap_or(0).max(0);
        let idx: Vec<i32> = keep.iter().map(|&i| i as i32).collect();
        let idx = Array::from_vec(&idx)?;
        self.inner.select(|buf| {
            let rows = buf.map(|a| ops::take(a, &idx, 0))?;
            if shift > 0 { rows.slice_seq(shift, rows.dim(2)?) } else { Ok(rows) }
        })?;
        self.inner.offset -= shift;
        self.left_padding = left_padding.iter().map(|p| p - shift).collect();
        Ok(())
    }

    /// Takes in the rows of `other` after this cache's: the shorter side is
    /// padded on the left so that every row's last position is in the last
    /// column. Both must be of the same kind of layer (the same window).
    /// When one side is quantised and the other is not, the other is
    /// quantised in the same format first, so rows can always join.
    pub fn extend(&mut self, other: &BatchKvCache) -> Result<()> {
        const OP: &str = "batch_kv_cache_extend";
        if self.window != other.window {
            return Err(Error::invalid(
                OP,
                format!("a cache with window {:?} cannot take rows with window {:?}", self.window, other.window),
            ));
        }
        let (ours, theirs) = (self.inner.offset(), other.inner.offset());
        let width = ours.max(theirs);
        // An empty side (no column written yet) is all padding, shaped like the other side.
        let written = |c: &KvCache| if c.offset() > 0 { c.parts().map(Some) } else { Ok(None) };
        let (mine_kv, theirs_kv) = (written(&self.inner)?, written(&other.inner)?);
        if let Some((like_k, like_v)) = mine_kv.clone().or_else(|| theirs_kv.clone()) {
            let side = |kv: Option<(KvArray, KvArray)>, rows: usize, held: i32| -> Result<(KvArray, KvArray)> {
                match kv {
                    Some((k, v)) => Ok((k.pad_front(width - held)?, v.pad_front(width - held)?)),
                    None => {
                        let zeros = |a: &Array| {
                            let s = a.shape();
                            ops::zeros(&[rows as i32, s[1], width, s[3]], a.dtype())
                        };
                        Ok((like_k.map(zeros)?, like_v.map(zeros)?))
                    }
                }
            };
            let (k, v) = side(mine_kv, self.rows(), ours)?;
            let (ok, ov) = side(theirs_kv, other.rows(), theirs)?;
            let (k, v, ok, ov) =
                (k.quantised_like(&ok)?, v.quantised_like(&ov)?, ok.quantised_like(&k)?, ov.quantised_like(&v)?);
            let keys = kv::concat(&[&k, &ok], 0)?;
            let values = kv::concat(&[&v, &ov], 0)?;
            self.inner = KvCache::from_parts(keys, values)?;
        } else {
            // Buffers of fewer rows would not take the batch's first update.
            self.inner = KvCache::new();
        }
        self.quant = self.quant.or(other.quant);
        let (mine, added) = (width - ours, width - theirs);
        self.left_padding =
            self.left_padding.iter().map(|p| p + mine).chain(other.left_padding.iter().map(|p| p + added)).collect();
        Ok(())
    }

    /// A sliding-window layer: drops the columns that no query from now on
    /// can see (those before `offset - window + 1` in every row) once there
    /// are at least `window` of them, so the cache holds at most about twice
    /// the window and each copy is paid for by `window` steps. Rope offsets
    /// and masks are unchanged; call it between forward passes.
    pub fn compact(&mut self) -> Result<()> {
        let Some(window) = self.window else { return Ok(()) };
        let dead = self.inner.offset() - window + 1;
        if dead < window {
            return Ok(());
        }
        let end = self.inner.offset();
        self.inner.select(|buf| buf.slice_seq(dead, end))?;
        self.inner.offset -= dead;
        for p in &mut self.left_padding {
            *p -= dead;
        }
        Ok(())
    }

    /// One row's keys and values (`[1, H, L, D]`, its real positions only:
    /// padding, and what [`compact`](Self::compact) dropped, left out) and
    /// its position. The arrays are copies in buffers of their own, so
    /// holding them does not keep the batch's buffers alive.
    ///
    /// # Errors
    ///
    /// When the row is out of range, or the cache quantised (use
    /// [`Self::row_parts`]).
    pub fn row(&self, row: usize) -> Result<(Array, Array, i32)> {
        let (k, v, position) = self.row_parts(row)?;
        Ok((k.dense("batch_kv_cache_row")?.clone(), v.dense("batch_kv_cache_row")?.clone(), position))
    }

    /// [`row`](Self::row) as stored (dense or quantised).
    pub fn row_parts(&self, row: usize) -> Result<(KvArray, KvArray, i32)> {
        let Some(&pad) = self.left_padding.get(row) else {
            return Err(Error::invalid("batch_kv_cache_row", format!("row {row} is out of range for {}", self.rows())));
        };
        let (k, v) = self.inner.parts()?;
        let index = Array::from_vec(&[row as i32])?;
        let (start, end) = (pad.max(0), self.inner.offset());
        // A gather copies exactly the row's real positions.
        let one = |a: &KvArray| a.slice_seq(start, end)?.map(|x| ops::take(x, &index, 0));
        Ok((one(&k)?, one(&v)?, end - pad))
    }

    /// Forgets the last `n` columns; returns how many.
    pub fn trim(&mut self, n: i32) -> i32 {
        self.inner.trim(n)
    }

    /// Bytes the buffers take (their whole capacity, every part).
    pub fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// The raw buffers (each one array or its quantised parts).
    pub fn state(&self) -> Vec<&Array> {
        self.inner.state()
    }
}
