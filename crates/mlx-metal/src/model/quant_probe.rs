// SPDX-License-Identifier: EUPL-1.2
//! What `auto` measures of a quantised checkpoint at load ([`facts`]), for
//! [`super::dtype::quant_choice`]: whether MLX's quantised matmul or a dense
//! float32 matmul is faster on this device, and whether the dense weights fit.
//! The checkpoint's own packed weights and scales are timed against their
//! dequantised float32 copies, with inputs of normal noise:
//!
//! - decode-sized: one row through every matrix a decode step reads (each
//!   block's projections, and the head: the embedding table when it is tied),
//!   each cut to the same share of its rows so that together they take at
//!   most [`DECODE_BYTES`] dense (the whole of a small model). Timing one
//!   small matrix over and over measures its speed from the CPU's caches,
//!   where dense float32 wins by 4×; a decode step reads every weight once
//!   from memory, where the 4 bytes a dense value takes against half a byte
//!   quantised even it out (SmolLM2 135M 4-bit decoded at about the same rate
//!   both ways, Gemma 3 270M, whose head is 60% of its weights, at 0.5–0.8×
//!   the rate dense);
//! - prefill-sized: [`PREFILL_ROWS`] rows through the largest matrix outside
//!   the embedding and the head (an MLP projection), where the dense side is
//!   compute-bound on BLAS. Fewer rows would favour the quantised side
//!   wrongly: its time grows with the rows, while a dense call's fixed costs
//!   (waking BLAS threads) do not.
//!
//! Each side runs once to warm up (which also reads the weights in from the
//! file) and then a few times, keeping the fastest (the least disturbed by
//! other work on the machine). The dense prefill runs more often because its
//! slow runs are not its speed: a multi-threaded BLAS's first calls wake its
//! threads, and on cores shared with other work a call can wait a whole
//! scheduler slice (~50 ms) for a descheduled thread where it otherwise takes
//! 0.3 ms (a loaded 2-core machine, OpenBLAS on 2 threads); its fast runs
//! cost next to nothing. The measurement adds about a second to loading a
//! small model on a 2-core machine (most of it the quantised side's loops),
//! and the dense copies it makes (at most [`DECODE_BYTES`]) are freed before
//! the model is built.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mlx::ops::{self, Quantized};
use mlx::{Array, Dtype, Result};

use super::dtype::{MIN_DENSE_BYTES, MatmulTimes, QuantFacts, Timing, fits};
use super::weights::{Weights, model_err};

/// Rows of the prefill-sized input: a prompt's worth (the quantised matmul's
/// time grows with the rows, the dense one's hardly at all).
pub const PREFILL_ROWS: i32 = 128;
/// The most bytes the decode-sized matrices take dense: more than most
/// CPUs' caches hold (on the 2-core machine of docs/benchmarks.md 128 MiB
/// and 512 MiB gave the same ratio).
pub const DECODE_BYTES: u64 = 256 << 20;
/// Timed runs of the decode-sized matmuls after the warm-up, each side.
pub const DECODE_RUNS: usize = 2;
/// Timed runs of the quantised prefill-sized matmul after the warm-up (its
/// time varies little and is the dearest to measure).
pub const QUANTISED_RUNS: usize = 1;
/// Timed runs of the dense prefill-sized matmul after the warm-up.
pub const DENSE_RUNS: usize = 6;

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
/// Nothing is timed where [`super::dtype::quant_choice`] would not look at
/// the times: a model too small for the choice to matter, or one whose dense
/// weights would not fit.
pub fn facts(weights: &Weights, time: bool) -> QuantFacts {
    let mut facts =
        QuantFacts { dense_bytes: dense_bytes(weights, 4), available_bytes: available_memory(), timing: None };
    if time && facts.dense_bytes >= MIN_DENSE_BYTES && fits(&facts).is_ok() {
        let matrices = quantised_matrices(weights);
        facts.timing = Some(match representative(&matrices) {
            Some(layer) => measure(weights, &matrices, layer).map_err(|e| e.to_string()),
            None => Err("the checkpoint has no quantised matrix to time".to_owned()),
        });
    }
    facts
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
        // Checked: config.json's group size may be anything (the model's load refuses it by name).
        let Some(cols) = ss[1].checked_mul(group_size).filter(|&c| c > 0) else { continue };
        let Some(bits) = ws[1].checked_mul(32).map(|b| b / cols) else { continue };
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

/// `m` as the checkpoint stores it.
fn stored(weights: &Weights, m: &QuantMatrix) -> Result<Quantized> {
    let get = |leaf: &str| {
        let name = format!("{}.{leaf}", m.prefix);
        weights.tensors().get(&name).cloned().ok_or_else(|| model_err(weights.dir(), format!("missing tensor {name}")))
    };
    let biases =
        if weights.tensors().contains_key(&format!("{}.biases", m.prefix)) { Some(get("biases")?) } else { None };
    Ok(Quantized { weight: get("weight")?, scales: get("scales")?, biases, group_size: m.group_size, bits: m.bits })
}

/// The first `rows` rows of `q` (whole groups: quantisation packs along the
/// columns).
fn first_rows(q: &Quantized, rows: i32) -> Result<Quantized> {
    let cut = |a: &Array| ops::slice_axis(a, 0, 0, rows);
    Ok(Quantized {
        weight: cut(&q.weight)?,
        scales: cut(&q.scales)?,
        biases: q.biases.as_ref().map(cut).transpose()?,
        group_size: q.group_size,
        bits: q.bits,
    })
}

/// The matrices a decode step reads: all of them but an embedding table
/// beside an output head (the table is only gathered from then).
fn decode_set(matrices: &[QuantMatrix]) -> Vec<&QuantMatrix> {
    let head = matrices.iter().any(|m| m.prefix.contains("lm_head"));
    matrices.iter().filter(|m| !(head && m.prefix.contains("embed_tokens"))).collect()
}

/// Times the decode-sized and the prefill-sized matmuls both ways.
fn measure(weights: &Weights, matrices: &[QuantMatrix], layer: &QuantMatrix) -> Result<Timing> {
    let key = mlx::random::key(0)?;
    let input = |rows: i32, cols: i32, dtype: Dtype| -> Result<(Array, Array)> {
        let x = mlx::random::normal(&[rows, cols], Dtype::Float32, 0.0, 1.0, Some(&key))?;
        // The quantised side computes in its scales' type, as the model would.
        let xq = ops::astype(&x, dtype)?;
        mlx::transforms::eval(&[&x, &xq])?;
        Ok((x, xq))
    };

    // Decode-sized: every matrix a step reads, cut to one share of its rows.
    let set = decode_set(matrices);
    let total: u64 = set.iter().map(|m| m.rows as u64 * m.cols as u64 * 4).sum();
    let share = (DECODE_BYTES as f64 / total.max(1) as f64).min(1.0);
    let (mut quantised, mut dense, mut bytes) = (Vec::new(), Vec::new(), 0u64);
    for m in &set {
        let rows = ((f64::from(m.rows) * share).ceil() as i32).clamp(1, m.rows);
        let q = first_rows(&stored(weights, m)?, rows)?;
        let d = ops::transpose(&ops::dequantize(&q, Some(Dtype::Float32))?, &[1, 0])?;
        bytes += rows as u64 * m.cols as u64 * 4;
        quantised.push((m.cols, q));
        dense.push((m.cols, d));
    }
    let mut inputs = std::collections::BTreeMap::new();
    for (cols, q) in &quantised {
        if !inputs.contains_key(cols) {
            inputs.insert(*cols, input(1, *cols, q.scales.dtype())?);
        }
    }
    let dense_refs: Vec<&Array> = dense.iter().map(|(_, d)| d).collect();
    mlx::transforms::eval(&dense_refs)?;
    let x = |cols: &i32| inputs.get(cols).ok_or_else(|| mlx::Error::invalid("quant_probe", "no input"));
    let decode = MatmulTimes {
        rows: 1,
        quantised: best_of(DECODE_RUNS, || {
            quantised.iter().map(|(c, q)| ops::quantized_matmul(&x(c)?.1, q, true)).collect()
        })?,
        dense: best_of(DECODE_RUNS, || dense.iter().map(|(c, d)| ops::matmul(&x(c)?.0, d)).collect())?,
    };
    drop((quantised, dense));

    // Prefill-sized: one layer, several rows.
    let q = stored(weights, layer)?;
    let d = ops::transpose(&ops::dequantize(&q, Some(Dtype::Float32))?, &[1, 0])?;
    d.eval()?;
    let (x, xq) = input(PREFILL_ROWS, layer.cols, q.scales.dtype())?;
    let prefill = MatmulTimes {
        rows: PREFILL_ROWS,
        quantised: best_of(QUANTISED_RUNS, || Ok(vec![ops::quantized_matmul(&xq, &q, true)?]))?,
        dense: best_of(DENSE_RUNS, || Ok(vec![ops::matmul(&x, &d)?]))?,
    };
    Ok(Timing {
        decode,
        decode_layers: set.len(),
        decode_bytes: bytes,
        prefill,
        shape: (layer.rows, layer.cols),
        bits: layer.bits,
    })
}

/// The fastest of `runs` evaluations of what `f` builds, after one to warm up.
fn best_of(runs: usize, f: impl Fn() -> Result<Vec<Array>>) -> Result<Duration> {
    let run = || -> Result<()> {
        let out = f()?;
        mlx::transforms::eval(&out.iter().collect::<Vec<_>>())
    };
    run()?;
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let started = Instant::now();
        run()?;
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
