// SPDX-License-Identifier: EUPL-1.2
//! Admission by KV-cache memory: a request joins only if the batch's caches,
//! at their widest, still fit the budget; one that could never fit is refused
//! with the figures.
//!
//! A row's footprint is every position it may hold: its conversation so far,
//! its prompt and its `max_tokens`. The batch is left-padded, so its caches
//! grow towards `rows × the widest footprint × bytes per token`; that is the
//! figure kept under the budget (an upper bound: rows that stop early, and
//! sliding-window layers, take less).
//!
//! With a quantised KV cache ([`KvQuant`]) a position costs the quantised
//! parts' bytes once the cache has converted, and the full-precision bytes
//! before `quantized_kv_start`; a row of `width` positions is counted as its
//! first `start` positions in full precision plus all `width` quantised (the
//! most it holds at once, the conversion included).
//!
//! With a draft model (speculative decoding) a row may also hold the draft's
//! caches for the same positions, in full precision: each position costs the
//! draft's bytes too.

use inference_core::Error as CoreError;
use mlx::{Result, ops};

use super::prefill::single_row_caches;
use crate::cache::{KvQuant, LayerCache};
use crate::model::LanguageModel;

/// The KV-cache budget and what one position of one row costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KvBudget {
    /// Bytes of keys and values per position of one row, all layers (once
    /// quantised, for a quantised cache).
    pub(crate) per_token: usize,
    /// Bytes the batch's caches may take.
    pub(crate) budget: usize,
    /// Bytes per position before the cache is quantised.
    dense_per_token: usize,
    /// Positions held in full precision before the cache converts (all of
    /// them without quantisation).
    dense_positions: usize,
}

impl KvBudget {
    /// The budget for `model` (and its `draft` model, when it speculates with
    /// one): `bytes`, or else three quarters of what MLX's memory limit leaves
    /// beside what is in use now (the weights) and the prompt cache's `store`
    /// bytes, or no bound where MLX reports no limit.
    pub(crate) fn for_model(
        model: &dyn LanguageModel,
        draft: Option<&dyn LanguageModel>,
        bytes: Option<usize>,
        store: usize,
        quant: Option<KvQuant>,
    ) -> Result<KvBudget> {
        let budget = match bytes {
            Some(b) => b,
            None => match mlx::memory::memory_limit()? {
                0 => usize::MAX,
                limit => limit.saturating_sub(mlx::memory::active_memory()?).saturating_sub(store) / 4 * 3,
            },
        };
        let (mut dense_per_token, mut per_token) = per_token(model, quant)?;
        if let Some(draft) = draft {
            // The draft's caches are never quantised.
            let (drafts, _) = self::per_token(draft, None)?;
            dense_per_token = dense_per_token.saturating_add(drafts);
            per_token = per_token.saturating_add(drafts);
        }
        let dense_positions = quant.map_or(usize::MAX, |q| q.start.max(0) as usize);
        Ok(KvBudget { per_token, budget, dense_per_token, dense_positions })
    }

    /// Bytes of one row of `width` positions at its largest.
    fn row_bytes(&self, width: usize) -> usize {
        let dense = width.min(self.dense_positions).saturating_mul(self.dense_per_token);
        if width > self.dense_positions { dense.saturating_add(width.saturating_mul(self.per_token)) } else { dense }
    }

    /// Whether `rows` rows whose widest footprint is `width` positions fit.
    pub(crate) fn fits(&self, rows: usize, width: usize) -> bool {
        rows.saturating_mul(self.row_bytes(width)) <= self.budget
    }

    /// Refuses a row that would not fit even alone.
    pub(crate) fn check(&self, footprint: usize) -> Result<(), CoreError> {
        if self.fits(1, footprint) {
            return Ok(());
        }
        Err(CoreError::invalid_setting(
            "max_tokens",
            format!("{footprint} positions (conversation, prompt and max_tokens)"),
            format!(
                "their KV cache would take {} bytes, more than the engine's budget of {} bytes (backend option \
                 kv_cache_bytes); ask for fewer tokens",
                self.row_bytes(footprint),
                self.budget
            ),
        ))
    }
}

/// Bytes of keys and values per position of one row, in full precision and
/// once quantised (the same without `quant`): read off the shapes of the
/// caches after one token, and of their quantised parts, a graph that is
/// built but never run. Sliding-window layers stay full precision.
///
/// # Errors
///
/// When `quant`'s group size does not divide a head dimension.
fn per_token(model: &dyn LanguageModel, quant: Option<KvQuant>) -> Result<(usize, usize)> {
    let mut caches = single_row_caches(model, quant)?;
    let x = ops::zeros(&[1, 1], mlx::Dtype::Int32)?;
    model.forward(&x, &mut caches)?;
    let (mut dense, mut quantised) = (0, 0);
    for c in &caches {
        if let LayerCache::Batch(b) = c {
            let (k, v, _) = b.row_parts(0)?;
            for a in [&k, &v] {
                dense += a.bytes_per_position();
                quantised += match b.quant() {
                    Some(q) => {
                        q.check_head_dims([a.dim(3)?])?;
                        a.quantise(q.group_size, q.bits)?.bytes_per_position()
                    }
                    None => a.bytes_per_position(),
                };
            }
        }
    }
    Ok((dense, quantised))
}

/// The prompt cache's bound: `bytes` when given, else an eighth of the
/// device's memory beside what is in use now (the weights). The device's
/// memory is MLX's memory limit, or, where MLX sets none (the CPU), the
/// machine's memory (8 GiB where neither is known).
pub(crate) fn prompt_cache_bytes(bytes: Option<usize>) -> Result<usize> {
    if let Some(b) = bytes {
        return Ok(b);
    }
    let memory = match mlx::memory::memory_limit()? {
        0 => machine_memory().unwrap_or(8 << 30),
        limit => limit,
    };
    Ok(memory.saturating_sub(mlx::memory::active_memory()?) / 8)
}

/// The machine's memory in bytes, where the system says (Linux's `/proc/meminfo`).
fn machine_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
