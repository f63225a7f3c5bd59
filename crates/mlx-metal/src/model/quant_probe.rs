// SPDX-License-Identifier: EUPL-1.2
//! What `auto` measures of a quantised checkpoint at load ([`facts`]), for
//! [`super::dtype::quant_choice`]: whether MLX's quantised matmul or a dense
//! float32 matmul is faster on this device, and whether the dense weights fit.
//!
//! The timed layer is the checkpoint's largest quantised matrix outside the
//! embedding and the head (an MLP projection: `intermediate × hidden`), with
//! its own packed weights and scales, against its dequantised float32 copy;
//! the inputs are one row (a decode step) and [`PREFILL_ROWS`] rows (a
//! prefill chunk) of normal noise. Each side runs once to warm up and then
//! [`REPEATS`] times, keeping the fastest (the least disturbed by other
//! work on the machine). On SmolLM2 135M this takes a few milliseconds.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mlx::ops::{self, Quantized};
use mlx::{Array, Dtype, Result};

use super::dtype::{MatmulTimes, QuantFacts, Timing};
use super::weights::{Weights, model_err};

/// Rows of the prefill-sized input.
pub const PREFILL_ROWS: i32 = 32;
/// Timed runs of each matmul after the warm-up; the fastest counts.
pub const REPEATS: usize = 3;

/// A quantised matrix of a checkpoint, as [`quantised_matrices`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantMatrix {
    /// The layer's path (`model.layers.0.mlp.up_proj`).
    pub prefix: String,
    /// Rows (output features, or the vocabulary of an embedding table).
    pub rows: i32,
    /// Columns before packing (input features).
    pub cols: i32,
    /// Values per scale.
    pub group_size: i32,
    /// Bits per value.
    pub bits: i32,
}

/// What [`super::dtype::choose_on`] needs of a quantised checkpoint: the
/// dense float32 size, the memory available and, when `time` is set, the
/// matmuls timed on the calling thread's device.
pub fn facts(weights: &Weights, time: bool) -> QuantFacts {
    let timing = time.then(|| {
        let matrices = quantised_matrices(weights);
        let layer =
            representative(&matrices).ok_or_else(|| "the checkpoint has no quantised matrix to time".to_owned())?;
        measure(weights, layer).map_err(|e| e.to_string())
    });
    QuantFacts { dense_bytes: dense_bytes(weights, 4), available_bytes: available_memory(), timing }
}

/// Every quantised matrix of the checkpoint (a packed `uint32` weight with
/// `scales` beside it), by name. The group size is config.json's (per
/// layer, else its default; 64 without a `quantization` entry), and the
/// bits follow from the shapes.
pub fn quantised_matrices(weights: &Weights) -> Vec<QuantMatrix> {
    let tensors = weights.tensors();
    let mut out = Vec::new();
    for (name, scales) in tensors {
        let Some(prefix) = name.strip_suffix(".scales") else { continue };
        let Some(packed) = tensors.get(&format!("{prefix}.weight")) else { continue };
        let (ws, ss) = (packed.shape(), scales.shape());
        if packed.dtype() != Dtype::Uint32 || ws.len() != 2 || ss.len() != 2 {
            continue;
        }
        let quant = weights.quant();
        let group_size =
            quant.and_then(|q| q.layer_override(prefix)).map(|(g, _)| g).or(quant.map(|q| q.group_size)).unwrap_or(64);
        let cols = ss[1] * group_size;
        if cols <= 0 {
            continue;
        }
        let bits = ws[1] * 32 / cols;
        out.push(QuantMatrix { prefix: prefix.to_owned(), rows: ws[0], cols, group_size, bits });
    }
    out
}

/// The bytes the checkpoint's weights take with every quantised matrix
/// dense and every floating-point value `bytes` bytes (4 for float32);
/// other tensors as they are.
pub fn dense_bytes(weights: &Weights, bytes: u64) -> u64 {
    let mut skip = BTreeSet::new();
    let mut total = 0u64;
    for m in quantised_matrices(weights) {
        total += m.rows as u64 * m.cols as u64 * bytes;
        for leaf in ["weight", "scales", "biases"] {
            skip.insert(format!("{}.{leaf}", m.prefix));
        }
    }
    for (_, a) in weights.tensors().iter().filter(|(n, _)| !skip.contains(*n)) {
        total += if a.dtype().is_float() { a.size() as u64 * bytes } else { a.nbytes() as u64 };
    }
    total
}

/// The largest quantised matrix outside the embedding and the head (the
/// first by name among equals); any matrix when there is no other.
fn representative(matrices: &[QuantMatrix]) -> Option<&QuantMatrix> {
    let outside = |m: &&QuantMatrix| !m.prefix.contains("embed_tokens") && !m.prefix.contains("lm_head");
    // `max_by_key` keeps the last of equals: search from the end for the first.
    let size = |m: &&QuantMatrix| i64::from(m.rows) * i64::from(m.cols);
    matrices.iter().rev().filter(outside).max_by_key(size).or_else(|| matrices.iter().rev().max_by_key(size))
}

/// Times `layer` quantised (as stored) and dense float32.
fn measure(weights: &Weights, layer: &QuantMatrix) -> Result<Timing> {
    let get = |leaf: &str| {
        let name = format!("{}.{leaf}", layer.prefix);
        weights.tensors().get(&name).cloned().ok_or_else(|| model_err(weights.dir(), format!("missing tensor {name}")))
    };
    let biases =
        if weights.tensors().contains_key(&format!("{}.biases", layer.prefix)) { Some(get("biases")?) } else { None };
    let q = Quantized {
        weight: get("weight")?,
        scales: get("scales")?,
        biases,
        group_size: layer.group_size,
        bits: layer.bits,
    };
    let dense = ops::dequantize(&q, Some(Dtype::Float32))?;
    let dense_t = ops::transpose(&dense, &[1, 0])?;
    mlx::transforms::eval(&[&q.weight, &q.scales, &dense_t])?;
    let key = mlx::random::key(0)?;
    let times = |rows: i32| -> Result<MatmulTimes> {
        let x = mlx::random::normal(&[rows, layer.cols], Dtype::Float32, 0.0, 1.0, Some(&key))?;
        // The quantised side computes in its scales' type, as the model would.
        let xq = ops::astype(&x, q.scales.dtype())?;
        mlx::transforms::eval(&[&x, &xq])?;
        Ok(MatmulTimes {
            rows,
            quantised: best_of(|| ops::quantized_matmul(&xq, &q, true))?,
            dense: best_of(|| ops::matmul(&x, &dense_t))?,
        })
    };
    let decode = times(1)?;
    let prefill = times(PREFILL_ROWS)?;
    Ok(Timing { shape: (layer.rows, layer.cols), bits: layer.bits, decode, prefill })
}

/// The fastest of [`REPEATS`] evaluations of `f` after one to warm up.
fn best_of(f: impl Fn() -> Result<Array>) -> Result<Duration> {
    f()?.eval()?;
    let mut best = Duration::MAX;
    for _ in 0..REPEATS {
        let started = Instant::now();
        f()?.eval()?;
        best = best.min(started.elapsed());
    }
    Ok(best)
}

/// The memory there is for the weights: MLX's memory limit less what is in
/// use, or where MLX sets none (the CPU) the machine's available memory
/// (Linux's `MemAvailable`); `None` when neither is known.
pub fn available_memory() -> Option<u64> {
    match mlx::memory::memory_limit() {
        Ok(limit) if limit > 0 => {
            let active = mlx::memory::active_memory().unwrap_or(0);
            Some(limit.saturating_sub(active) as u64)
        }
        _ => meminfo_available(),
    }
}

fn meminfo_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(prefix: &str, rows: i32, cols: i32) -> QuantMatrix {
        QuantMatrix { prefix: prefix.into(), rows, cols, group_size: 64, bits: 4 }
    }

    #[test]
    fn the_representative_layer_is_the_largest_outside_the_embedding_and_head() {
        let ms = [
            m("model.embed_tokens", 49152, 576),
            m("model.layers.0.mlp.down_proj", 576, 1536),
            m("model.layers.0.mlp.gate_proj", 1536, 576),
            m("model.layers.0.self_attn.q_proj", 576, 576),
        ];
        assert_eq!(representative(&ms).map(|m| m.prefix.as_str()), Some("model.layers.0.mlp.down_proj"));
        assert_eq!(representative(&ms[..1]).map(|m| m.prefix.as_str()), Some("model.embed_tokens"));
        assert_eq!(representative(&[]), None);
    }
}
