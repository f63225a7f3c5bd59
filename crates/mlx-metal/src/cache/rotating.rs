// SPDX-License-Identifier: EUPL-1.2
//! [`RotatingKvCache`]: keeps at most `max_size` positions (sliding-window
//! layers, or a context limit), reading back in chronological order after
//! wrapping.

use mlx::ops;
use mlx::{Array, Error, Result};

use super::{Mask, STEP, causal_mask, seq_len, slice_seq, write_seq, written, zeros_like_steps};

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
        // Both 4-D before their first three axes are compared (a session file can hold anything).
        seq_len(OP, &values)?;
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
