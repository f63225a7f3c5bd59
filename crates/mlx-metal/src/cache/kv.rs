// SPDX-License-Identifier: EUPL-1.2
//! Keys or values as a cache stores them: a dense `[B, H, L, D]` array, or
//! MLX's affine-quantised triple (packed data `[B, H, L, D·bits/32]` as
//! uint32, scales and biases `[B, H, L, D/group]` in the model's dtype), as
//! mlx-lm's `QuantizedKVCache` keeps them.
//!
//! Why one type for both: every operation a cache does on its buffers —
//! slice positions, take rows, concatenate, pad with zeros, write in place —
//! acts on axes 0 and 2, which the three quantised components share with
//! the dense array. [`KvArray`] maps each such operation over its components,
//! so [`KvCache`](super::KvCache) and [`BatchKvCache`](super::BatchKvCache)
//! (filter, extend, compact, rows) handle quantised buffers with the same
//! code as dense ones, and every generation path of the scheduler gets the
//! quantised cache without code of its own. (A separate quantised cache type
//! would have needed its own batch cache, its own row moves and its own
//! session conversions.)

use mlx::ops::{self, Quantized};
use mlx::{Array, Error, Result};

/// Keys or values held by a cache: dense, or affine-quantised along the
/// head dimension.
#[derive(Debug, Clone)]
pub enum KvArray {
    /// `[B, H, L, D]` in the model's dtype.
    Dense(Array),
    /// Quantised in groups of the head dimension (MLX's affine mode).
    Quantised(Quantized),
}

/// What attention gets from the cache: everything cached, dense or quantised.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// Keys and values, `[B, H_kv, L, D]`.
    Dense(Array, Array),
    /// Quantised keys and values (see [`KvArray::Quantised`]).
    Quantised(Quantized, Quantized),
}

impl Fetched {
    /// The dense keys and values.
    ///
    /// # Errors
    ///
    /// When they are quantised.
    pub fn into_dense(self) -> Result<(Array, Array)> {
        match self {
            Fetched::Dense(k, v) => Ok((k, v)),
            Fetched::Quantised(..) => Err(quantised_error("kv_cache_fetch")),
        }
    }

    /// Keys and values as stored.
    pub(super) fn from_pair(keys: KvArray, values: KvArray) -> Result<Fetched> {
        match (keys, values) {
            (KvArray::Dense(k), KvArray::Dense(v)) => Ok(Fetched::Dense(k, v)),
            (KvArray::Quantised(k), KvArray::Quantised(v)) => Ok(Fetched::Quantised(k, v)),
            _ => Err(Error::invalid("kv_cache_fetch", "keys and values are stored differently")),
        }
    }
}

/// The error of a dense-only call on a quantised cache.
pub(super) fn quantised_error(op: &'static str) -> Error {
    Error::invalid(op, "the cache is quantised (kv_bits); it has no dense keys and values")
}

impl KvArray {
    /// The arrays it is made of: one, or data, scales and biases.
    pub fn parts(&self) -> Vec<&Array> {
        match self {
            KvArray::Dense(a) => vec![a],
            KvArray::Quantised(q) => std::iter::once(&q.weight).chain([&q.scales]).chain(q.biases.as_ref()).collect(),
        }
    }

    /// Whether it is quantised.
    pub fn is_quantised(&self) -> bool {
        matches!(self, KvArray::Quantised(_))
    }

    /// The dense array.
    ///
    /// # Errors
    ///
    /// When it is quantised.
    pub fn dense(&self, op: &'static str) -> Result<&Array> {
        match self {
            KvArray::Dense(a) => Ok(a),
            KvArray::Quantised(_) => Err(quantised_error(op)),
        }
    }

    /// `f` applied to every part (axes 0 to 2 are common to all parts).
    pub fn map(&self, f: impl Fn(&Array) -> Result<Array>) -> Result<KvArray> {
        Ok(match self {
            KvArray::Dense(a) => KvArray::Dense(f(a)?),
            KvArray::Quantised(q) => KvArray::Quantised(Quantized {
                weight: f(&q.weight)?,
                scales: f(&q.scales)?,
                biases: q.biases.as_ref().map(&f).transpose()?,
                group_size: q.group_size,
                bits: q.bits,
            }),
        })
    }

    /// Size of axis `axis` (0 rows, 1 heads, 2 positions).
    pub fn dim(&self, axis: i32) -> Result<i32> {
        match self {
            KvArray::Dense(a) => a.dim(axis),
            KvArray::Quantised(q) => q.weight.dim(axis),
        }
    }

    /// The shape of the first three axes, `[B, H, L]`.
    pub fn lead_shape(&self) -> Vec<i32> {
        let first = match self {
            KvArray::Dense(a) => a,
            KvArray::Quantised(q) => &q.weight,
        };
        first.shape().into_iter().take(3).collect()
    }

    /// Bytes of all parts.
    pub fn nbytes(&self) -> usize {
        self.parts().iter().map(|a| a.nbytes()).sum()
    }

    /// Bytes one position of one row takes (all heads, all parts).
    pub fn bytes_per_position(&self) -> usize {
        self.parts()
            .iter()
            .map(|a| {
                let s = a.shape();
                s.get(1).copied().unwrap_or(0).max(0) as usize
                    * s.get(3).copied().unwrap_or(0).max(0) as usize
                    * a.dtype().size_of()
            })
            .sum()
    }

    /// Positions `start..stop` (axis 2).
    pub fn slice_seq(&self, start: i32, stop: i32) -> Result<KvArray> {
        self.map(|a| ops::slice_axis(a, 2, start, stop))
    }

    /// Rows `start..stop` (axis 0).
    pub fn slice_rows(&self, start: i32, stop: i32) -> Result<KvArray> {
        self.map(|a| ops::slice_axis(a, 0, start, stop))
    }

    /// Zeros of the same kind with `positions` positions (zero data, scales
    /// and biases dequantise to zeros).
    pub fn zeros_with_positions(&self, positions: i32) -> Result<KvArray> {
        self.map(|a| {
            let s = a.shape();
            ops::zeros(&[s[0], s[1], positions, s[3]], a.dtype())
        })
    }

    /// `n` zero positions before the first.
    pub fn pad_front(&self, n: i32) -> Result<KvArray> {
        if n == 0 {
            return Ok(self.clone());
        }
        concat(&[&self.zeros_with_positions(n)?, self], 2)
    }

    /// `update` written over positions `start..` (a slice update that writes
    /// in place when nobody else holds the buffer).
    pub fn write_seq(&self, update: &KvArray, start: i32) -> Result<KvArray> {
        let (mine, theirs) = (self.parts(), update.parts());
        if mine.len() != theirs.len() {
            return Err(Error::invalid("kv_cache_update", "the update is stored differently from the cache"));
        }
        let written: Vec<Array> = mine
            .iter()
            .zip(&theirs)
            .map(|(buf, upd)| {
                let s = buf.shape();
                let len = upd.dim(2)?;
                ops::slice_update(buf, upd, &[0, 0, start, 0], &[s[0], s[1], start + len, s[3]])
            })
            .collect::<Result<_>>()?;
        Ok(rebuild(self, written))
    }

    /// Quantised in the same format as `like` (itself when already
    /// quantised, or when `like` is dense).
    pub fn quantised_like(&self, like: &KvArray) -> Result<KvArray> {
        match (self, like) {
            (KvArray::Dense(a), KvArray::Quantised(q)) => {
                Ok(KvArray::Quantised(ops::quantize(a, q.group_size, q.bits)?))
            }
            _ => Ok(self.clone()),
        }
    }

    /// Quantised with `group_size` and `bits` (itself when already quantised).
    pub fn quantise(&self, group_size: i32, bits: i32) -> Result<KvArray> {
        match self {
            KvArray::Dense(a) => Ok(KvArray::Quantised(ops::quantize(a, group_size, bits)?)),
            KvArray::Quantised(_) => Ok(self.clone()),
        }
    }
}

/// Parts in [`KvArray::parts`] order put back into `like`'s kind.
fn rebuild(like: &KvArray, parts: Vec<Array>) -> KvArray {
    let mut it = parts.into_iter();
    match like {
        KvArray::Dense(a) => KvArray::Dense(it.next().unwrap_or_else(|| a.clone())),
        KvArray::Quantised(q) => {
            let weight = it.next().unwrap_or_else(|| q.weight.clone());
            let scales = it.next().unwrap_or_else(|| q.scales.clone());
            KvArray::Quantised(Quantized {
                weight,
                scales,
                biases: q.biases.as_ref().map(|b| it.next().unwrap_or_else(|| b.clone())),
                group_size: q.group_size,
                bits: q.bits,
            })
        }
    }
}

/// `arrays` joined along `axis` (0 rows, 2 positions); all of one kind.
pub(super) fn concat(arrays: &[&KvArray], axis: i32) -> Result<KvArray> {
    let Some(first) = arrays.first() else {
        return Err(Error::invalid("kv_cache_concat", "nothing to join"));
    };
    let n = first.parts().len();
    if arrays.iter().any(|a| a.parts().len() != n || a.is_quantised() != first.is_quantised()) {
        return Err(Error::invalid("kv_cache_concat", "dense and quantised buffers cannot be joined"));
    }
    let joined: Vec<Array> = (0..n)
        .map(|i| {
            let parts: Vec<&Array> = arrays.iter().map(|a| a.parts()[i]).collect();
            ops::concatenate(&parts, axis)
        })
        .collect::<Result<_>>()?;
    Ok(rebuild(first, joined))
}
