// SPDX-License-Identifier: EUPL-1.2
//! `auto`'s choice for a quantised checkpoint on a CPU ([`quant_choice`]):
//! keep it quantised or dequantise it to dense float32 at load, from what
//! [`super::quant_probe`] measured ([`QuantFacts`]). Pure, so that every
//! outcome is tested without timing anything; re-exported by
//! [`super::dtype`], which turns the choice into the compute type.

use std::time::Duration;

/// One matmul timed both ways: quantised as the checkpoint is, and dense
/// float32 after dequantising (the best of a few runs each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulTimes {
    /// Rows of the input.
    pub rows: i32,
    /// MLX's quantised matmul.
    pub quantised: Duration,
    /// The dense float32 matmul.
    pub dense: Duration,
}

impl MatmulTimes {
    fn describe(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "{} row{}: {:.3} ms quantised, {:.3} ms dense",
            self.rows,
            if self.rows == 1 { "" } else { "s" },
            ms(self.quantised),
            ms(self.dense)
        )
    }
}

/// What the load measured of a quantised checkpoint, for the choice
/// between keeping it quantised and dequantising it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantFacts {
    /// The bytes of the model's weights once dequantised to float32.
    pub dense_bytes: u64,
    /// The memory there is for them: MLX's memory limit less what is in use,
    /// or where MLX sets none the machine's available memory; `None` when
    /// unknown.
    pub available_bytes: Option<u64>,
    /// The timed matmuls; the reason in words when none were timed (they
    /// failed, or there was no point); `None` when nothing was measured
    /// (only `auto` on a CPU measures).
    pub timing: Option<Result<Timing, String>>,
}

/// The matmuls [`QuantFacts`] timed (see [`super::quant_probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Decode-sized: one row through each of `decode_layers` of the
    /// checkpoint's layers.
    pub decode: MatmulTimes,
    /// How many layers the decode-sized input went through.
    pub decode_layers: usize,
    /// Their bytes dense in float32: more than a CPU's caches hold, so that
    /// both sides read their weights from memory, as a decode step does.
    pub decode_bytes: u64,
    /// Prefill-sized: several rows through one layer.
    pub prefill: MatmulTimes,
    /// That layer's `[out, in]`.
    pub shape: (i32, i32),
    /// Its quantisation's bits.
    pub bits: i32,
}

impl Timing {
    fn describe(&self) -> String {
        format!(
            "{} through {} layers ({} dense); {} through a [{}, {}] {}-bit layer",
            self.decode.describe(),
            self.decode_layers,
            gb(self.decode_bytes),
            self.prefill.describe(),
            self.shape.0,
            self.shape.1,
            self.bits
        )
    }
}

/// The choice between keeping a quantised checkpoint and dequantising it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantChoice {
    /// Dequantise, for this reason.
    Dequantise(String),
    /// Keep it quantised, for this reason.
    Keep(String),
}

/// The share of the available memory the dense weights may take: the rest
/// is for the KV cache, the activations and everything else on the machine.
pub const DENSE_MEMORY_SHARE: f64 = 0.5;

/// Below this many bytes dense (32 MiB) a model is kept quantised without
/// measuring: a step of so small a model is all fixed costs, so the choice
/// cannot matter, while times that close make it flip from one load to the
/// next (the tiny test fixtures).
pub const MIN_DENSE_BYTES: u64 = 32 << 20;

/// How much slower than the quantised ones the dense decode-sized matmuls
/// may be when the dense prefill is faster: 10%. A decode step reads every
/// weight once, so on a CPU both sides are bound by memory and come out
/// close (measured on SmolLM2 135M: within noise), while the dense prefill
/// runs on BLAS at 10–30 times the quantised one; a tie must not keep that
/// from being used.
pub const DECODE_TOLERANCE: f64 = 1.1;

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// Whether the dense weights fit: at most [`DENSE_MEMORY_SHARE`] of the
/// available memory. `Err` says why not.
pub fn fits(facts: &QuantFacts) -> Result<String, String> {
    match facts.available_bytes {
        None => Err(format!(
            "the dense float32 weights would take {} and the available memory is unknown",
            gb(facts.dense_bytes)
        )),
        Some(avail) if facts.dense_bytes as f64 > avail as f64 * DENSE_MEMORY_SHARE => Err(format!(
            "the dense float32 weights would take {}, more than half of the {} available",
            gb(facts.dense_bytes),
            gb(avail)
        )),
        Some(avail) => {
            Ok(format!("the dense weights ({}) fit in half of the {} available", gb(facts.dense_bytes), gb(avail)))
        }
    }
}

/// `auto`'s rule for a quantised checkpoint on a CPU: dequantise when the
/// dense weights take at least [`MIN_DENSE_BYTES`] and at most
/// [`DENSE_MEMORY_SHARE`] of the available memory,
/// the dense prefill-sized matmul was faster than the quantised one, and the
/// dense decode-sized ones were at most [`DECODE_TOLERANCE`] times as slow;
/// keep it quantised otherwise, and when nothing was measured.
pub fn quant_choice(facts: &QuantFacts) -> QuantChoice {
    let fit = match fits(facts) {
        Ok(fit) => fit,
        Err(why) => return QuantChoice::Keep(why),
    };
    if facts.dense_bytes < MIN_DENSE_BYTES {
        return QuantChoice::Keep(format!(
            "the model is too small for the choice to matter ({} dense): not measured",
            gb(facts.dense_bytes)
        ));
    }
    let timing = match &facts.timing {
        Some(Ok(t)) => t,
        Some(Err(e)) => return QuantChoice::Keep(format!("the matmuls were not timed ({e})")),
        None => return QuantChoice::Keep("nothing was measured".into()),
    };
    let measured = timing.describe();
    let prefill = timing.prefill.dense < timing.prefill.quantised;
    let decode = timing.decode.dense.as_secs_f64() <= timing.decode.quantised.as_secs_f64() * DECODE_TOLERANCE;
    match (prefill, decode) {
        (true, true) => QuantChoice::Dequantise(format!(
            "dense float32 was faster to prefill and at most 10% slower to decode ({measured}), and {fit}"
        )),
        (false, _) => QuantChoice::Keep(format!("dense float32 was not faster to prefill ({measured})")),
        (true, false) => QuantChoice::Keep(format!("dense float32 was more than 10% slower to decode ({measured})")),
    }
}
