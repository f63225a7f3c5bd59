// SPDX-License-Identifier: EUPL-1.2
//! [`Tolerance`]: how far a value may be from the reference; [`Tolerances`]: everything a
//! comparison of one fixture may forgive, picked by dtype, quantisation and model size.

use crate::golden::{Kind, ModelGolden};

/// `|actual - expected| <= atol + rtol * |expected|`, both finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f64,
    /// Relative part, against the reference value.
    pub rtol: f64,
}

impl Tolerance {
    /// A tolerance.
    pub const fn new(atol: f64, rtol: f64) -> Self {
        Tolerance { atol, rtol }
    }

    /// The largest gap allowed around `expected`.
    pub fn allowed(&self, expected: f64) -> f64 {
        self.atol + self.rtol * expected.abs()
    }

    /// Whether `actual` is close enough to `expected`. A NaN or infinity never is, unless both
    /// are the same infinity.
    pub fn accepts(&self, expected: f64, actual: f64) -> bool {
        if !expected.is_finite() || !actual.is_finite() {
            return expected == actual;
        }
        (actual - expected).abs() <= self.allowed(expected)
    }

    fn scaled(self, atol: f64, rtol: f64) -> Self {
        Tolerance { atol: self.atol * atol, rtol: self.rtol * rtol }
    }
}

/// Everything a comparison may forgive, for one fixture.
///
/// [`Tolerances::for_golden`] picks them from the dtype of mlx-lm's logits, whether the weights are
/// quantised, and whether the model is tiny (2–4 layers) or real (18–30 layers):
///
/// | logits dtype | quantised | logits atol | logits rtol | tie    |
/// |--------------|-----------|-------------|-------------|--------|
/// | float32      | no        | 1e-4        | 1e-4        | 2e-3   |
/// | float32      | yes       | 1e-3        | 1e-3        | 2e-2   |
/// | float16      | no        | 1e-2        | 5e-3        | 5e-2   |
/// | float16      | yes       | 2e-2        | 1e-2        | 1e-1   |
/// | bfloat16     | no        | 5e-2        | 2e-2        | 2.5e-1 |
/// | bfloat16     | yes       | 1e-1        | 4e-2        | 5e-1   |
///
/// Real models multiply `atol` and `tie` by 4 and `rtol` by 2. bfloat16 keeps 8 significant bits
/// (a logit of 10 is a multiple of 1/16), so one rounding step apart is already 0.06 there.
/// Quantised weights are the same bytes on both sides; only the order of the arithmetic differs,
/// so they get twice their activation dtype's tolerance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// Every logit, top-k value and row checksum (the checksums as a mean and a root mean square).
    pub logits: Tolerance,
    /// Log-probabilities of the greedy tokens (twice the logits' absolute part: a difference of two
    /// logits).
    pub logprobs: Tolerance,
    /// A top-1 disagreement is forgiven when the reference's own logits for the two ids are at
    /// most this far apart (a near tie); a greedy divergence is forgiven at a step where the
    /// reference's margin is at most this, and the comparison of that run stops there.
    pub tie: f64,
}

impl Tolerances {
    /// The tolerances for a golden (see the table on [`Tolerances`]).
    pub fn for_golden(golden: &ModelGolden) -> Self {
        Self::for_dtype(&golden.logits_dtype, golden.quantization.is_some(), golden.kind)
    }

    /// The tolerances for a dtype name (`float32`, `float16`, `bfloat16`; anything else is treated
    /// as bfloat16, the loosest).
    pub fn for_dtype(dtype: &str, quantised: bool, kind: Kind) -> Self {
        let (logits, tie) = match (dtype, quantised) {
            ("float32", false) => (Tolerance::new(1e-4, 1e-4), 2e-3),
            ("float32", true) => (Tolerance::new(1e-3, 1e-3), 2e-2),
            ("float16", false) => (Tolerance::new(1e-2, 5e-3), 5e-2),
            ("float16", true) => (Tolerance::new(2e-2, 1e-2), 1e-1),
            (_, false) => (Tolerance::new(5e-2, 2e-2), 2.5e-1),
            (_, true) => (Tolerance::new(1e-1, 4e-2), 5e-1),
        };
        let (logits, tie) = match kind {
            Kind::Tiny => (logits, tie),
            Kind::Real => (logits.scaled(4.0, 2.0), tie * 4.0),
        };
        Tolerances { logits, logprobs: logits.scaled(2.0, 1.0), tie }
    }
}
