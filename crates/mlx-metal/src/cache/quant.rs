// SPDX-License-Identifier: EUPL-1.2
//! [`KvQuant`]: the quantised KV cache's settings (mlx-lm's `kv_bits`,
//! `kv_group_size` and `quantized_kv_start`), read from a model's load
//! settings, and applied to the caches a generation starts with.
//!
//! A cache with these settings stays full precision until, after a forward
//! pass, it holds at least `start` positions; the next forward pass converts
//! it (the whole buffer, as mlx-lm's `to_quantized`) and from then on new
//! keys and values are quantised as they are written. mlx-lm converts right
//! after the forward pass instead; the caches hold the same values either
//! way when the next pass reads them. A cache never converts while empty, so
//! with `start` 0 the first forward pass attends in full precision, as in
//! mlx-lm (whose caches start as `KVCache`).
//!
//! Sliding-window layers (Gemma 3's local layers) stay full precision: they
//! hold at most about twice their window, and mlx-lm cannot quantise them
//! either (its `RotatingKVCache.to_quantized` raises).

use std::collections::BTreeMap;

use mlx::{Error, Result};

use super::{BatchKvCache, KvCache, LayerCache};

/// mlx-lm's default `quantized_kv_start`.
pub const DEFAULT_QUANTIZED_KV_START: i32 = 5000;

/// mlx-lm's default `kv_group_size`.
pub const DEFAULT_KV_GROUP_SIZE: i32 = 64;

/// How a KV cache is quantised, and from which position on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvQuant {
    /// Bits per element: 4 or 8.
    pub bits: i32,
    /// Elements of the head dimension per scale and bias: 32, 64 or 128.
    pub group_size: i32,
    /// The cache stays full precision until it holds this many positions.
    pub start: i32,
}

impl KvQuant {
    /// Settings checked for what MLX and mlx-lm accept.
    ///
    /// # Errors
    ///
    /// A value out of range, named with the option it came from.
    pub fn new(bits: i32, group_size: i32, start: i32) -> Result<KvQuant> {
        if ![4, 8].contains(&bits) {
            return Err(bad("kv_bits", &bits.to_string(), "must be 4 or 8"));
        }
        if ![32, 64, 128].contains(&group_size) {
            return Err(bad("kv_group_size", &group_size.to_string(), "must be 32, 64 or 128"));
        }
        if start < 0 {
            return Err(bad("quantized_kv_start", &start.to_string(), "must be a whole number of at least 0"));
        }
        Ok(KvQuant { bits, group_size, start })
    }

    /// The settings that the load settings' backend options `kv_bits` (4 or
    /// 8), `kv_group_size` (32, 64 or 128; default 64) and
    /// `quantized_kv_start` (>= 0; default 5000, as mlx-lm) set; `None`
    /// without `kv_bits` (the other two are still checked).
    ///
    /// # Errors
    ///
    /// An option with a bad value, named with its value.
    pub fn from_backend_options(options: &BTreeMap<String, String>) -> Result<Option<KvQuant>> {
        let read = |key: &'static str, default: i32, rule: &str| -> Result<i32> {
            match options.get(key) {
                None => Ok(default),
                Some(v) => v.trim().parse::<i32>().map_err(|_| bad(key, v, rule)),
            }
        };
        let group_size = read("kv_group_size", DEFAULT_KV_GROUP_SIZE, "must be 32, 64 or 128")?;
        let start = read("quantized_kv_start", DEFAULT_QUANTIZED_KV_START, "must be a whole number of at least 0")?;
        let bits = match options.get("kv_bits") {
            None => {
                // Checked all the same, so a typo does not go unnoticed.
                KvQuant::new(8, group_size, start)?;
                return Ok(None);
            }
            Some(_) => read("kv_bits", 0, "must be 4 or 8")?,
        };
        KvQuant::new(bits, group_size, start).map(Some)
    }

    /// Checks that the group size divides every head dimension in `dims`
    /// (MLX quantises the head dimension in whole groups).
    ///
    /// # Errors
    ///
    /// Naming the group size and the head dimension.
    pub fn check_head_dims(&self, dims: impl IntoIterator<Item = i32>) -> Result<()> {
        for d in dims {
            if d % self.group_size != 0 {
                return Err(bad(
                    "kv_group_size",
                    &self.group_size.to_string(),
                    &format!("must divide the model's head dimension {d}; try a smaller kv_group_size or no kv_bits"),
                ));
            }
        }
        Ok(())
    }

    /// `caches` (fresh ones from `make_cache`, or batch caches) with these
    /// settings on every full-attention layer; sliding-window layers are left
    /// as they are.
    pub fn apply(self, caches: Vec<LayerCache>) -> Vec<LayerCache> {
        caches
            .into_iter()
            .map(|c| match c {
                LayerCache::Standard(k) => LayerCache::Standard(k.with_quant(Some(self))),
                LayerCache::Batch(b) => LayerCache::Batch(b.with_quant(Some(self))),
                other => other,
            })
            .collect()
    }
}

/// `caches` with `quant` applied, or unchanged without it.
pub fn with_kv_quant(caches: Vec<LayerCache>, quant: Option<KvQuant>) -> Vec<LayerCache> {
    match quant {
        Some(q) => q.apply(caches),
        None => caches,
    }
}

fn bad(key: &str, value: &str, rule: &str) -> Error {
    Error::invalid("load_settings", format!("{key} = {value:?} {rule}"))
}

// Keep the two cache kinds' setters next to the settings they take.
impl KvCache {
    /// The same cache, converting to `quant` once it holds `quant.start`
    /// positions (`None`: never).
    pub fn with_quant(mut self, quant: Option<KvQuant>) -> KvCache {
        self.quant = quant;
        self
    }
}

impl BatchKvCache {
    /// The same cache, converting to `quant` once a row's position reaches
    /// `quant.start`; a sliding-window cache stays full precision.
    pub fn with_quant(mut self, quant: Option<KvQuant>) -> BatchKvCache {
        if self.window().is_none() {
            self.quant = quant;
        }
        self
    }
}
