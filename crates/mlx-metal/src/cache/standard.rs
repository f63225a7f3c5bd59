// SPDX-License-Identifier: EUPL-1.2
//! [`KvCache`]: the standard cache, which grows in steps of 256 positions
//! and writes new keys and values in place; dense, or quantised (see
//! [`KvQuant`]) once it holds enough positions.

use mlx::{Array, Error, Result};

use super::kv::{self, Fetched, KvArray, quantised_error};
use super::{KvQuant, Mask, STEP, causal_mask, seq_len};

/// A cache that grows in steps of 256 positions.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    keys: Option<KvArray>,
    values: Option<KvArray>,
    // The batch cache (a sibling module) shifts it when it drops columns.
    pub(super) offset: i32,
    /// When to convert to quantised storage (none: never).
    pub(super) quant: Option<KvQuant>,
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

    /// Whether keys and values are stored quantised.
    pub fn is_quantised(&self) -> bool {
        self.keys.as_ref().is_some_and(KvArray::is_quantised)
    }

    /// The quantisation settings, if any.
    pub fn quant(&self) -> Option<KvQuant> {
        self.quant
    }

    /// Appends `keys`/`values` (dense) and returns everything cached so far
    /// (dense).
    ///
    /// # Errors
    ///
    /// When the cache is quantised (use [`Self::append`]).
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        self.append(keys, values)?.into_dense()
    }

    /// Appends `keys`/`values` and returns everything cached so far, as
    /// stored. A cache with [`KvQuant`] settings that holds at least their
    /// `start` positions is first converted to quantised storage.
    pub fn append(&mut self, keys: &Array, values: &Array) -> Result<Fetched> {
        if let Some(q) = self.quant
            && self.offset > 0
            && self.offset >= q.start
        {
            self.quantise(q)?;
        }
        self.write(keys, values)
    }

    /// Converts the buffers to quantised storage (nothing when already
    /// quantised or empty).
    pub(super) fn quantise(&mut self, q: KvQuant) -> Result<()> {
        if let (Some(k), Some(v)) = (&self.keys, &self.values)
            && !k.is_quantised()
        {
            let (k, v) = (k.quantise(q.group_size, q.bits)?, v.quantise(q.group_size, q.bits)?);
            self.keys = Some(k);
            self.values = Some(v);
        }
        Ok(())
    }

    /// Appends in the buffers' own format (no conversion).
    pub(super) fn write(&mut self, keys: &Array, values: &Array) -> Result<Fetched> {
        let n = seq_len("kv_cache_update", keys)?;
        seq_len("kv_cache_update", values)?;
        let (mut upd_k, mut upd_v) = (KvArray::Dense(keys.clone()), KvArray::Dense(values.clone()));
        if let (Some(k), Some(v)) = (&self.keys, &self.values) {
            upd_k = upd_k.quantised_like(k)?;
            upd_v = upd_v.quantised_like(v)?;
        }
        let prev = self.offset;
        let grow = match &self.keys {
            None => true,
            Some(k) => prev + n > k.dim(2)?,
        };
        if grow {
            let steps = (STEP + n - 1) / STEP;
            let new_k = upd_k.zeros_with_positions(steps * STEP)?;
            let new_v = upd_v.zeros_with_positions(steps * STEP)?;
            match (self.keys.take(), self.values.take()) {
                (Some(mut k), Some(mut v)) => {
                    if prev % STEP != 0 {
                        k = k.slice_seq(0, prev)?;
                        v = v.slice_seq(0, prev)?;
                    }
                    self.keys = Some(kv::concat(&[&k, &new_k], 2)?);
                    self.values = Some(kv::concat(&[&v, &new_v], 2)?);
                }
                _ => {
                    self.keys = Some(new_k);
                    self.values = Some(new_v);
                }
            }
        }
        // Take the buffers out so the slice update holds the only reference
        // and MLX can write in place.
        let (k, v) = match (self.keys.take(), self.values.take()) {
            (Some(k), Some(v)) => (k, v),
            _ => return Err(Error::invalid("kv_cache_update", "the cache has no buffers")),
        };
        let k = k.write_seq(&upd_k, prev)?;
        let v = v.write_seq(&upd_v, prev)?;
        self.offset += n;
        self.keys = Some(k);
        self.values = Some(v);
        self.fetch()
    }

    /// The cached keys and values, `[B, H, offset, D]` (dense).
    ///
    /// # Errors
    ///
    /// When the cache is empty or quantised (use [`Self::fetch`]).
    pub fn keys_and_values(&self) -> Result<(Array, Array)> {
        if self.is_quantised() {
            return Err(quantised_error("kv_cache_fetch"));
        }
        self.fetch()?.into_dense()
    }

    /// The cached keys and values as stored: the first `offset` positions.
    pub fn fetch(&self) -> Result<Fetched> {
        let (k, v) = self.parts()?;
        Fetched::from_pair(k, v)
    }

    /// The first `offset` positions of the buffers, as stored.
    pub fn parts(&self) -> Result<(KvArray, KvArray)> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.offset < k.dim(2)? => {
                Ok((k.slice_seq(0, self.offset)?, v.slice_seq(0, self.offset)?))
            }
            (Some(k), Some(v)) => Ok((k.clone(), v.clone())),
            _ => Err(Error::invalid("kv_cache_fetch", "the cache is empty")),
        }
    }

    /// Forgets the last `n` positions (at most all of them); returns how many.
    pub fn trim(&mut self, n: i32) -> i32 {
        let n = n.clamp(0, self.offset);
        self.offset -= n;
        n
    }

    /// A cache holding `keys`/`values` (`[B, H, L, D]`), all `L` positions written.
    pub fn from_state(keys: Array, values: Array) -> Result<Self> {
        Self::from_parts(KvArray::Dense(keys), KvArray::Dense(values))
    }

    /// A cache holding `keys`/`values` as stored (dense or quantised, both
    /// alike), all their positions written.
    pub fn from_parts(keys: KvArray, values: KvArray) -> Result<Self> {
        const OP: &str = "kv_cache_restore";
        let offset = keys.dim(2)?;
        if keys.lead_shape() != values.lead_shape() || keys.is_quantised() != values.is_quantised() {
            return Err(Error::invalid(
                OP,
                format!("keys {:?} and values {:?} disagree", keys.lead_shape(), values.lead_shape()),
            ));
        }
        if keys.parts().iter().chain(values.parts().iter()).any(|a| a.ndim() != 4) {
            return Err(Error::invalid(OP, "keys and values must be [B, H, L, D]"));
        }
        Ok(KvCache { keys: Some(keys), values: Some(values), offset, quant: None })
    }

    /// Replaces both buffers with `f(buffer)`.
    pub(super) fn select(&mut self, f: impl Fn(&KvArray) -> Result<KvArray>) -> Result<()> {
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

    /// Bytes the buffers take (their whole capacity, every part).
    pub fn nbytes(&self) -> usize {
        self.keys.iter().chain(self.values.iter()).map(KvArray::nbytes).sum()
    }

    /// The raw buffers (for evaluation and saving): keys then values, each
    /// one array or its quantised parts.
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).flat_map(KvArray::parts).collect()
    }
}
