// SPDX-License-Identifier: EUPL-1.2
//! Key-value caches, one per layer, owned by a session (never by the model).
//!
//! - [`KvCache`]: grows in steps of 256 positions and writes new keys and
//!   values in place (a slice update of a buffer nobody else holds).
//! - [`RotatingKvCache`]: keeps at most `max_size` positions (sliding-window
//!   layers, or a context limit); after wrapping, reads come back in
//!   chronological order.
//! - [`BatchKvCache`]: a left-padded batch of sequences of different
//!   lengths (mlx-lm's `BatchKVCache`), each row with its own positions and
//!   a mask that hides its padding.
//! - [`LayerCache`]: one layer's cache, any of the three; models ask it for
//!   the rope offset ([`Offset`]) and the attention [`Mask`] (see
//!   [`causal_mask`]).
//! - [`KvQuant`]: the quantised KV cache (mlx-lm's `kv_bits`,
//!   `kv_group_size`, `quantized_kv_start`). [`KvCache`] and [`BatchKvCache`]
//!   store keys and values as a [`KvArray`], dense or quantised, and hand
//!   attention a [`Fetched`] of either kind; sliding-window layers stay full
//!   precision.
//!
//! [`KvCache`] and [`RotatingKvCache`] follow mlx-lm's `KVCache` and
//! `RotatingKVCache` step for step, so the attention masks and results match
//! the reference exactly. Keys and values are `[B, H_kv, L, D]`.

mod batch;
mod kv;
mod mask;
mod quant;
mod rotating;
mod standard;

pub use batch::BatchKvCache;
pub use kv::{Fetched, KvArray};
pub use mask::{Mask, causal_mask};
pub use quant::{DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START, KvQuant, with_kv_quant};
pub use rotating::RotatingKvCache;
pub use standard::KvCache;

use mlx::ops;
use mlx::{Array, Error, Result};

const STEP: i32 = 256;

/// Where the positions of a forward pass's new tokens start: one offset for
/// every row, or one per row (a left-padded batch).
#[derive(Debug, Clone)]
pub enum Offset {
    /// The same offset for every row.
    Fixed(i32),
    /// An int32 `[B]` array, one offset per row.
    PerRow(Array),
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

    /// Appends and returns what attention should see: dense keys and
    /// values, or quantised ones once a quantised cache has converted.
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<Fetched> {
        match self {
            LayerCache::Standard(c) => c.append(keys, values),
            LayerCache::Rotating(c) => c.update_and_fetch(keys, values).map(|(k, v)| Fetched::Dense(k, v)),
            LayerCache::Batch(c) => c.append(keys, values),
        }
    }

    /// Bytes of keys and values held, all parts, whole capacity.
    pub fn nbytes(&self) -> usize {
        match self {
            LayerCache::Standard(c) => c.nbytes(),
            LayerCache::Batch(c) => c.nbytes(),
            LayerCache::Rotating(c) => c.state().iter().map(|a| a.nbytes()).sum(),
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
