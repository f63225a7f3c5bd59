// SPDX-License-Identifier: EUPL-1.2
//! Key-value caches, one per layer, owned by a session (never by the model).
//!
//! - [`KvCache`]: grows in steps of 256 positions and writes new keys and
//!   values in place (a slice update of a buffer nobody else holds).
//! - [`RotatingKvCache`]: keeps at most `max_size` positions (sliding-window
//!   layers, or a context limit); after wrapping, reads come back in
//!   chronological order.
//!
//! Both follow mlx-lm's `KVCache` and `RotatingKVCache` step for step, so the
//! attention masks and results match the reference exactly. Keys and values
//! are `[B, H_kv, L, D]`.

use mlx::ops;
use mlx::{Array, Dtype};
use mlx::{Error, Result};

const STEP: i32 = 256;

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

/// Where the positions of a forward pass's new tokens start: one offset for
/// every row, or one per row (a left-padded batch).
#[derive(Debug, Clone)]
pub enum Offset {
    /// The same offset for every row.
    Fixed(i32),
    /// An int32 `[B]` array, one offset per row.
    PerRow(Array),
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

fn seq_len(op: &'static str, a: &Array) -> Result<i32> {
    if a.ndim() != 4 {
        return Err(Error::invalid(op, format!("keys and values must be [B, H, L, D], got {:?}", a.shape())));
    }
    a.dim(2)
}

fn slice_seq(a: &Array, start: i32, stop: i32) -> Result<Array> {
    ops::slice_axis(a, 2, start, stop)
}

fn write_seq(buf: &Array, update: &Array, start: i32) -> Result<Array> {
    let s = buf.shape();
    let len = update.dim(2)?;
    ops::slice_update(buf, update, &[0, 0, start, 0], &[s[0], s[1], start + len, s[3]])
}

/// The first `offset` positions of the buffers (all of them when full).
fn written(op: &'static str, keys: &Option<Array>, values: &Option<Array>, offset: i32) -> Result<(Array, Array)> {
    match (keys, values) {
        (Some(k), Some(v)) if offset < k.dim(2)? => Ok((slice_seq(k, 0, offset)?, slice_seq(v, 0, offset)?)),
        (Some(k), Some(v)) => Ok((k.clone(), v.clone())),
        _ => Err(Error::invalid(op, "the cache is empty")),
    }
}

fn zeros_like_steps(like: &Array, positions: i32) -> Result<Array> {
    let s = like.shape();
    ops::zeros(&[s[0], s[1], positions, s[3]], like.dtype())
}

/// A cache that grows in steps of 256 positions.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions seen so far.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Appends `keys`/`values` and returns everything cached so far.
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let n = seq_len("kv_cache_update", keys)?;
        let prev = self.offset;
        let grow = match &self.keys {
            None => true,
            Some(k) => prev + n > k.dim(2)?,
        };
        if grow {
            let steps = (STEP + n - 1) / STEP;
            let new_k = zeros_like_steps(keys, steps * STEP)?;
            let new_v = zeros_like_steps(values, steps * STEP)?;
            match (self.keys.take(), self.values.take()) {
                (Some(mut k), Some(mut v)) => {
                    if prev % STEP != 0 {
                        k = slice_seq(&k, 0, prev)?;
                        v = slice_seq(&v, 0, prev)?;
                    }
                    self.keys = Some(ops::concatenate(&[&k, &new_k], 2)?);
                    self.values = Some(ops::concatenate(&[&v, &new_v], 2)?);
                }
                _ => {
                    self.keys = Some(new_k);
                    self.values = Some(new_v);
                }
            }
        }
        let (k, v) = self.buffers("kv_cache_update")?;
        let k = write_seq(&k, keys, prev)?;
        let v = write_seq(&v, values, prev)?;
        self.offset += n;
        self.keys = Some(k);
        self.values = Some(v);
        self.keys_and_values()
    }

    fn buffers(&mut self, op: &'static str) -> Result<(Array, Array)> {
        // Take the buffers out so the slice update holds the only reference
        // and MLX can write in place.
        match (self.keys.take(), self.values.take()) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(Error::invalid(op, "the cache has no buffers")),
        }
    }

    /// The cached keys and values, `[B, H, offset, D]`.
    pub fn keys_and_values(&self) -> Result<(Array, Array)> {
        written("kv_cache_fetch", &self.keys, &self.values, self.offset)
    }

    /// Forgets the last `n` positions (at most all of them); returns how many.
    pub fn trim(&mut self, n: i32) -> i32 {
        let n = n.clamp(0, self.offset);
        self.offset -= n;
        n
    }

    /// A cache holding `keys`/`values` (`[B, H, L, D]`), all `L` positions written.
    pub fn from_state(keys: Array, values: Array) -> Result<Self> {
        let offset = seq_len("kv_cache_restore", &keys)?;
        if keys.shape()[..3] != values.shape()[..3] {
            return Err(Error::invalid(
                "kv_cache_restore",
                format!("keys {:?} and values {:?} disagree", keys.shape(), values.shape()),
            ));
        }
        Ok(KvCache { keys: Some(keys), values: Some(values), offset })
    }

    /// Replaces both buffers with `f(buffer)`.
    fn select(&mut self, f: impl Fn(&Array) -> Result<Array>) -> Result<()> {
        if let (Some(k), Some(v)) = (&self.keys, &self.values) {
            let (k, v) = (f(k)?, f(v)?);
            self.keys = Some(k);
            self.values = Some(v);
        }
        Ok(())
    }

    /// The attention mask for `n` new queries.
    pub fn make_mask(&self, n: i32, window: Option<i32>) -> Result<Mask> {
        if let Some(w) = window {
            return Ok(Mask::Array(causal_mask(n, self.offset, Some(w))?));
        }
        Ok(if n == 1 { Mask::None } else { Mask::Causal })
    }

    /// The raw buffers (for evaluation and saving).
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
    }
}

/// A cache that keeps the last `max_size` positions.
#[derive(Debug, Clone)]
pub struct RotatingKvCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
    max_size: i32,
    keep: i32,
    idx: i32,
}

impl RotatingKvCache {
    /// An empty cache that keeps at most `max_size` positions.
    pub fn new(max_size: i32) -> Result<Self> {
        Self::with_keep(max_size, 0)
    }

    /// An empty cache that keeps at most `max_size` positions, of which the
    /// first `keep` (e.g. a system prompt's first tokens) are never rotated out.
    pub fn with_keep(max_size: i32, keep: i32) -> Result<Self> {
        if max_size < 1 || keep < 0 || keep >= max_size {
            return Err(Error::invalid(
                "rotating_kv_cache",
                format!("max size {max_size} must be at least 1 and keep {keep} in [0, max size)"),
            ));
        }
        Ok(RotatingKvCache { keys: None, values: None, offset: 0, max_size, keep, idx: 0 })
    }

    /// Positions seen so far (including those rotated out).
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// The first positions that are never rotated out.
    pub fn keep(&self) -> i32 {
        self.keep
    }

    /// A cache whose kept positions are `keys`/`values` in chronological
    /// order (as [`Self::ordered`] returns them) after `offset` positions.
    pub fn from_state(keys: Array, values: Array, offset: i32, max_size: i32, keep: i32) -> Result<Self> {
        const OP: &str = "rotating_kv_cache_restore";
        let mut c = Self::with_keep(max_size, keep)?;
        let len = seq_len(OP, &keys)?;
        if keys.shape()[..3] != values.shape()[..3] {
            return Err(Error::invalid(
                OP,
                format!("keys {:?} and values {:?} disagree", keys.shape(), values.shape()),
            ));
        }
        if len > offset || (offset > len && len < max_size) {
            return Err(Error::invalid(
                OP,
                format!("{len} kept positions cannot follow {offset} seen (window {max_size})"),
            ));
        }
        c.keys = Some(keys);
        c.values = Some(values);
        c.offset = offset;
        c.idx = len;
        Ok(c)
    }

    /// The most positions kept.
    pub fn max_size(&self) -> i32 {
        self.max_size
    }

    /// Keys/values rearranged into chronological order, the unused end cut off.
    fn temporal_order(&self, v: &Array) -> Result<Array> {
        let len = v.dim(2)?;
        if self.idx == len {
            Ok(v.clone())
        } else if self.idx < self.offset {
            ops::concatenate(
                &[&slice_seq(v, 0, self.keep)?, &slice_seq(v, self.idx, len)?, &slice_seq(v, self.keep, self.idx)?],
                2,
            )
        } else {
            slice_seq(v, 0, self.idx)
        }
    }

    fn trim_front(&self, v: &Array, trim: i32, append: Option<&Array>) -> Result<Array> {
        let len = v.dim(2)?;
        let kept = if trim > 0 {
            ops::concatenate(&[&slice_seq(v, 0, self.keep)?, &slice_seq(v, trim + self.keep, len)?], 2)?
        } else {
            v.clone()
        };
        match append {
            Some(a) => ops::concatenate(&[&kept, a], 2),
            None => Ok(kept),
        }
    }

    fn update_concat(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        match (self.keys.take(), self.values.take()) {
            (Some(k), Some(v)) => {
                let k = self.temporal_order(&k)?;
                let v = self.temporal_order(&v)?;
                self.idx = k.dim(2)?;
                // Keep max_size - 1 old positions so every new query sees a
                // full window.
                let trim = self.idx - self.max_size + 1;
                self.keys = Some(self.trim_front(&k, trim, Some(keys))?);
                self.values = Some(self.trim_front(&v, trim, Some(values))?);
            }
            _ => {
                self.keys = Some(keys.clone());
                self.values = Some(values.clone());
            }
        }
        self.offset += keys.dim(2)?;
        let (k, v) = (self.keys.clone(), self.values.clone());
        self.idx = k.as_ref().map_or(Ok(0), |k| k.dim(2))?;
        match (k, v) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(Error::invalid("rotating_kv_cache_update", "the cache has no buffers")),
        }
    }

    fn update_in_place(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let s = seq_len("rotating_kv_cache_update", keys)?;
        let prev = self.offset;
        let grow = match &self.keys {
            None => true,
            Some(k) => {
                let len = k.dim(2)?;
                prev >= len && len < self.max_size
            }
        };
        if grow {
            let new_size = STEP.min(self.max_size - prev);
            let new_k = zeros_like_steps(keys, new_size)?;
            let new_v = zeros_like_steps(values, new_size)?;
            match (self.keys.take(), self.values.take()) {
                (Some(k), Some(v)) => {
                    self.keys = Some(ops::concatenate(&[&k, &new_k], 2)?);
                    self.values = Some(ops::concatenate(&[&v, &new_v], 2)?);
                }
                _ => {
                    self.keys = Some(new_k);
                    self.values = Some(new_v);
                }
            }
            self.idx = prev;
        }
        let (mut k, mut v) = match (self.keys.take(), self.values.take()) {
            (Some(k), Some(v)) => (k, v),
            _ => return Err(Error::invalid("rotating_kv_cache_update", "the cache has no buffers")),
        };
        let trim = k.dim(2)? - self.max_size;
        if trim > 0 {
            k = self.trim_front(&k, trim, None)?;
            v = self.trim_front(&v, trim, None)?;
            self.idx = self.max_size;
        }
        if self.idx == self.max_size {
            self.idx = self.keep;
        }
        let k = write_seq(&k, keys, self.idx)?;
        let v = write_seq(&v, values, self.idx)?;
        self.offset += s;
        self.idx += s;
        self.keys = Some(k);
        self.values = Some(v);
        self.keys_and_values()
    }

    /// Appends `keys`/`values` and returns what attention should see: after a
    /// multi-token update the full concatenation (so every new query sees its
    /// whole window), after a one-token update the kept window.
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        if seq_len("rotating_kv_cache_update", keys)? == 1 {
            self.update_in_place(keys, values)
        } else {
            self.update_concat(keys, values)
        }
    }

    /// The stored keys and values (in storage order; see [`Self::ordered`]).
    pub fn keys_and_values(&self) -> Result<(Array, Array)> {
        written("rotating_kv_cache_fetch", &self.keys, &self.values, self.offset)
    }

    /// The kept keys and values in chronological order.
    pub fn ordered(&self) -> Result<(Array, Array)> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => Ok((self.temporal_order(k)?, self.temporal_order(v)?)),
            _ => Err(Error::invalid("rotating_kv_cache_fetch", "the cache is empty")),
        }
    }

    /// Positions kept.
    pub fn len(&self) -> i32 {
        self.offset.min(self.max_size)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.offset == 0
    }

    /// Whether [`Self::trim`] can still undo positions (nothing rotated out yet).
    pub fn is_trimmable(&self) -> bool {
        self.offset < self.max_size
    }

    /// Forgets the last `n` positions; returns how many.
    pub fn trim(&mut self, n: i32) -> i32 {
        let n = n.clamp(0, self.offset);
        self.offset -= n;
        self.idx -= n;
        n
    }

    /// The attention mask for `n` new queries (`window` defaults to `max_size`).
    pub fn make_mask(&self, n: i32, window: Option<i32>) -> Result<Mask> {
        if n > 1 {
            let window = window.unwrap_or(self.max_size);
            let offset = (self.max_size - 1).min(self.offset);
            if offset + n > window { Ok(Mask::Array(causal_mask(n, offset, Some(window))?)) } else { Ok(Mask::Causal) }
        } else {
            match window {
                Some(w) if self.offset >= w && self.max_size > w => {
                    let idx = if self.idx >= self.max_size { 0 } else { self.idx };
                    let size = if self.offset < self.max_size { self.offset + 1 } else { self.max_size };
                    // Position p (in storage order) is visible when it is one of
                    // the last `w`; rolling by idx + 1 maps chronological order
                    // to storage order.
                    let mut visible = Vec::with_capacity(size as usize);
                    for i in 0..size {
                        let chrono = (i - (idx + 1)).rem_euclid(size);
                        visible.push(chrono >= size - w);
                    }
                    Ok(Mask::Array(Array::from_slice(&visible, &[size])?))
                }
                _ => Ok(Mask::None),
            }
        }
    }

    /// The raw buffers (for evaluation and saving).
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
    }
}

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

/// One layer's cache.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// Grows without bound.
    Standard(KvCache),
    /// Keeps a window.
    Rotating(RotatingKvCache),
    /// A left-padded batch.
    Batch(BatchKvCache),
}

impl LayerCache {
    /// Positions seen so far.
    pub fn offset(&self) -> i32 {
        match self {
            LayerCache::Standard(c) => c.offset(),
            LayerCache::Rotating(c) => c.offset(),
            LayerCache::Batch(c) => c.offset(),
        }
    }

    /// Where the rope positions of the next tokens start.
    pub fn rope_offset(&self) -> Result<Offset> {
        match self {
            LayerCache::Batch(c) => c.rope_offset(),
            _ => Ok(Offset::Fixed(self.offset())),
        }
    }

    /// Appends and returns what attention should see.
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        match self {
            LayerCache::Standard(c) => c.update_and_fetch(keys, values),
            LayerCache::Rotating(c) => c.update_and_fetch(keys, values),
            LayerCache::Batch(c) => c.update_and_fetch(keys, values),
        }
    }

    /// The attention mask for `n` new queries.
    pub fn make_mask(&self, n: i32, window: Option<i32>) -> Result<Mask> {
        match self {
            LayerCache::Standard(c) => c.make_mask(n, window),
            LayerCache::Rotating(c) => c.make_mask(n, window),
            LayerCache::Batch(c) => c.make_mask(n, window),
        }
    }

    /// Forgets the last `n` positions where the cache can; returns how many.
    pub fn trim(&mut self, n: i32) -> i32 {
        match self {
            LayerCache::Standard(c) => c.trim(n),
            LayerCache::Rotating(c) => c.trim(n),
            LayerCache::Batch(c) => c.trim(n),
        }
    }

    /// Whether trimming is possible.
    pub fn is_trimmable(&self) -> bool {
        match self {
            LayerCache::Standard(_) | LayerCache::Batch(_) => true,
            LayerCache::Rotating(c) => c.is_trimmable(),
        }
    }

    /// The raw buffers.
    pub fn state(&self) -> Vec<&Array> {
        match self {
            LayerCache::Standard(c) => c.state(),
            LayerCache::Rotating(c) => c.state(),
            LayerCache::Batch(c) => c.state(),
        }
    }
}
