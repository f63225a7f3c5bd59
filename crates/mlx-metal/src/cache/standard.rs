// SPDX-License-Identifier: EUPL-1.2
//! [`KvCache`]: the standard cache, which grows in steps of 256 positions
//! and writes new keys and values in place.

use mlx::ops;
use mlx::{Array, Error, Result};

use super::{Mask, STEP, causal_mask, seq_len, slice_seq, write_seq, written, zeros_like_steps};

/// A cache that grows in steps of 256 positions.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    // The batch cache (a sibling module) shifts it when it drops columns.
    pub(super) offset: i32,
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
    pub(super) fn select(&mut self, f: impl Fn(&Array) -> Result<Array>) -> Result<()> {
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
