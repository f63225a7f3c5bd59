// SPDX-License-Identifier: EUPL-1.2
//! Tolerances per dtype, the comparisons, and what they report when a backend diverges.

use std::fmt;

use crate::golden::{GreedyRun, Kind, ModelGolden, RowChecksums, Sequence, TopK};

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

/// What differed at the first diverging place.
#[derive(Debug, Clone, PartialEq)]
pub enum Gap {
    /// A number: a logit (with its vocabulary id), a checksum or a log-probability.
    Value {
        /// The vocabulary id, for a logit.
        vocab_id: Option<u32>,
        /// mlx-lm's value.
        expected: f64,
        /// The backend's value.
        actual: f64,
        /// `|actual - expected|` (infinite when one is not finite).
        gap: f64,
        /// The tolerance there.
        allowed: f64,
    },
    /// A token id: a greedy step, a top-1 choice or an encoded id.
    Token {
        /// mlx-lm's id (None: the backend produced more).
        expected: Option<u32>,
        /// The backend's id (None: it produced fewer).
        actual: Option<u32>,
        /// For greedy and top-1: how far apart mlx-lm's two candidates were.
        margin: Option<f64>,
    },
    /// Text: a decode or a rendered chat template.
    Text {
        /// The reference text.
        expected: String,
        /// The backend's text.
        actual: String,
        /// Byte offset of the first difference.
        byte: usize,
    },
    /// A count: rows, row width.
    Shape {
        /// What it should be.
        expected: usize,
        /// What it was.
        actual: usize,
    },
}

/// The first place where a backend's output leaves the reference, with enough context to start
/// debugging: the fixture, the check, the case, the position and the size of the gap.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    /// The fixture (`gemma3-tiny`, `tokenizer-tiny-spm`, ...).
    pub fixture: String,
    /// The check (`logits`, `top-k`, `checksum max`, `greedy`, `encode`, `chat template`, ...).
    pub check: String,
    /// The sequence, greedy run, conversation or corpus text.
    pub case: String,
    /// Token position in the sequence, greedy step, or index in the encoded ids.
    pub position: usize,
    /// The input token at that position, for logits.
    pub input_token: Option<u32>,
    /// What differed.
    pub gap: Gap,
    /// How widespread the divergence is (for logits: how many positions, and the worst gap).
    pub summary: Option<String>,
}

fn show_text(s: &str, around: usize) -> String {
    let start = s.floor_char_boundary(around.saturating_sub(24));
    let end = s.ceil_char_boundary((around + 24).min(s.len()));
    format!("{}{:?}{}", if start > 0 { "…" } else { "" }, &s[start..end], if end < s.len() { "…" } else { "" })
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} / {} `{}`: first divergence at position {}", self.fixture, self.check, self.case, self.position)?;
        if let Some(t) = self.input_token {
            write!(f, " (input token {t})")?;
        }
        match &self.gap {
            Gap::Value { vocab_id, expected, actual, gap, allowed } => {
                if let Some(id) = vocab_id {
                    write!(f, ": vocab id {id} is")?;
                } else {
                    write!(f, ": got")?;
                }
                write!(f, " {actual:.6} against mlx-lm's {expected:.6}, gap {gap:.3e} > allowed {allowed:.3e}")?;
            }
            Gap::Token { expected, actual, margin } => {
                let show = |t: &Option<u32>| t.map_or_else(|| "nothing".to_string(), |t| format!("token {t}"));
                write!(f, ": got {}, mlx-lm has {}", show(actual), show(expected))?;
                if let Some(m) = margin {
                    write!(f, " (mlx-lm's margin there: {m:.4})")?;
                }
            }
            Gap::Text { expected, actual, byte } => {
                write!(
                    f,
                    ": texts differ at byte {byte}: got {} against {}",
                    show_text(actual, *byte),
                    show_text(expected, *byte)
                )?;
            }
            Gap::Shape { expected, actual } => write!(f, ": {actual} where mlx-lm has {expected}")?,
        }
        if let Some(s) = &self.summary {
            write!(f, "; {s}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Miss {
    position: usize,
    vocab_id: Option<u32>,
    expected: f64,
    actual: f64,
    gap: f64,
    allowed: f64,
}

fn gap_of(expected: f64, actual: f64) -> f64 {
    if expected.is_finite() && actual.is_finite() { (actual - expected).abs() } else { f64::INFINITY }
}

/// Collects the misses of one sequence and turns them into a [`Divergence`] with a summary.
struct Misses {
    positions: usize,
    first: Option<Miss>,
    worst: Option<Miss>,
    diverging: usize,
}

impl Misses {
    fn new(positions: usize) -> Self {
        Misses { positions, first: None, worst: None, diverging: 0 }
    }

    /// Records the worst miss of one position (positions must come in order).
    fn position(&mut self, worst_here: Option<Miss>) {
        let Some(m) = worst_here else { return };
        self.diverging += 1;
        if self.first.is_none() {
            self.first = Some(m);
        }
        if self.worst.is_none_or(|w| m.gap > w.gap) {
            self.worst = Some(m);
        }
    }

    fn into_result(self, fixture: &str, check: &str, seq: &Sequence) -> Result<(), Box<Divergence>> {
        let Some(first) = self.first else { return Ok(()) };
        let summary = self.worst.map(|w| {
            let id = w.vocab_id.map(|i| format!(" (vocab id {i})")).unwrap_or_default();
            format!(
                "{} of {} positions diverge, the largest gap {:.3e} at position {}{id}",
                self.diverging, self.positions, w.gap, w.position
            )
        });
        Err(Box::new(Divergence {
            fixture: fixture.to_string(),
            check: check.to_string(),
            case: seq.name.clone(),
            position: first.position,
            input_token: seq.tokens.get(first.position).copied(),
            gap: Gap::Value {
                vocab_id: first.vocab_id,
                expected: first.expected,
                actual: first.actual,
                gap: first.gap,
                allowed: first.allowed,
            },
            summary,
        }))
    }
}

fn shape(fixture: &str, check: &str, case: &str, position: usize, expected: usize, actual: usize) -> Box<Divergence> {
    Box::new(Divergence {
        fixture: fixture.to_string(),
        check: check.to_string(),
        case: case.to_string(),
        position,
        input_token: None,
        gap: Gap::Shape { expected, actual },
        summary: None,
    })
}

/// Compares a backend's logits for one golden sequence: every value when the golden has full
/// rows (tiny models), otherwise top-k and checksums (real models, see [`compare_top_k`]).
///
/// # Errors
/// The first divergence: the lowest position with a value out of tolerance, the vocabulary id
/// with the biggest gap there, and how many positions diverge in all.
pub fn compare_logits(
    fixture: &str,
    seq: &Sequence,
    actual: &[Vec<f32>],
    tol: &Tolerances,
) -> Result<(), Box<Divergence>> {
    if actual.len() != seq.tokens.len() {
        return Err(shape(fixture, "logits rows", &seq.name, 0, seq.tokens.len(), actual.len()));
    }
    match (&seq.logits, &seq.top_k, &seq.checksums) {
        (Some(expected), _, _) => compare_full(fixture, seq, expected, actual, tol),
        (None, Some(top), Some(sums)) => compare_top_k(fixture, seq, top, sums, actual, tol),
        _ => Err(shape(fixture, "golden without logits", &seq.name, 0, 1, 0)),
    }
}

fn compare_full(
    fixture: &str,
    seq: &Sequence,
    expected: &[Vec<f32>],
    actual: &[Vec<f32>],
    tol: &Tolerances,
) -> Result<(), Box<Divergence>> {
    let mut misses = Misses::new(expected.len());
    for (pos, (want, got)) in expected.iter().zip(actual).enumerate() {
        if want.len() != got.len() {
            return Err(shape(fixture, "logits row width", &seq.name, pos, want.len(), got.len()));
        }
        let mut worst: Option<Miss> = None;
        for (id, (&e, &a)) in want.iter().zip(got).enumerate() {
            let (e, a) = (f64::from(e), f64::from(a));
            if !tol.logits.accepts(e, a) {
                let gap = gap_of(e, a);
                if worst.is_none_or(|w| gap > w.gap) {
                    let vocab_id = u32::try_from(id).ok();
                    worst = Some(Miss {
                        position: pos,
                        vocab_id,
                        expected: e,
                        actual: a,
                        gap,
                        allowed: tol.logits.allowed(e),
                    });
                }
            }
        }
        misses.position(worst);
    }
    misses.into_result(fixture, "logits", seq)
}

fn argmax(row: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() {
            return None;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// Row checksums as the comparisons use them: the mean and the root mean square stand in for the
/// sum and the sum of squares, so one tolerance per logit applies to all of them.
fn checksum_views(c: &RowChecksums, width: usize) -> [(&'static str, f64); 5] {
    let n = width.max(1) as f64;
    [
        ("mean", c.sum / n),
        ("rms", (c.sum_sq / n).max(0.0).sqrt()),
        ("min", c.min),
        ("max", c.max),
        ("logsumexp", c.logsumexp),
    ]
}

/// The checksums of a row, computed as `make_goldens.py` does (float64 from float32).
pub fn row_checksums(row: &[f32]) -> RowChecksums {
    let (mut sum, mut sum_sq, mut min, mut max) = (0.0f64, 0.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &v in row {
        let v = f64::from(v);
        sum += v;
        sum_sq += v * v;
        min = min.min(v);
        max = max.max(v);
    }
    let lse = max + row.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>().ln();
    RowChecksums {
        sum,
        sum_sq,
        min,
        max,
        argmax: argmax(row).and_then(|i| u32::try_from(i).ok()).unwrap_or(u32::MAX),
        logsumexp: lse,
    }
}

/// Real models: at every position,
/// 1. the backend's top-1 id is mlx-lm's, or mlx-lm's logit for the backend's choice is within
///    [`Tolerances::tie`] of its best (a near tie; an id outside mlx-lm's top-k is never one);
/// 2. the backend's logit for each of mlx-lm's top-k ids is within the logits tolerance;
/// 3. the row's mean, root mean square, min, max and logsumexp are within the logits tolerance.
///
/// # Errors
/// The first divergence, as for [`compare_logits`].
pub fn compare_top_k(
    fixture: &str,
    seq: &Sequence,
    top: &TopK,
    sums: &[RowChecksums],
    actual: &[Vec<f32>],
    tol: &Tolerances,
) -> Result<(), Box<Divergence>> {
    // Top-1 first: a wrong choice is the most useful thing to report.
    for (pos, (row, (ids, values))) in actual.iter().zip(top.ids.iter().zip(&top.values)).enumerate() {
        let (Some(&best_id), Some(&best)) = (ids.first(), values.first()) else { continue };
        let got = argmax(row);
        if got == usize::try_from(best_id).ok() {
            continue;
        }
        let got_id = got.and_then(|g| u32::try_from(g).ok());
        let theirs = got_id.and_then(|g| ids.iter().position(|&i| i == g)).map(|k| values[k]);
        let margin = theirs.map(|v| f64::from(best) - f64::from(v));
        if margin.is_some_and(|m| m <= tol.tie) {
            continue;
        }
        return Err(Box::new(Divergence {
            fixture: fixture.to_string(),
            check: "top-1".to_string(),
            case: seq.name.clone(),
            position: pos,
            input_token: seq.tokens.get(pos).copied(),
            gap: Gap::Token { expected: Some(best_id), actual: got_id, margin },
            summary: Some(format!("near ties up to {:.3e} are forgiven", tol.tie)),
        }));
    }
    let mut misses = Misses::new(actual.len());
    for (pos, (row, (ids, values))) in actual.iter().zip(top.ids.iter().zip(&top.values)).enumerate() {
        let mut worst: Option<Miss> = None;
        for (&id, &want) in ids.iter().zip(values) {
            let Some(&got) = usize::try_from(id).ok().and_then(|i| row.get(i)) else {
                return Err(shape(fixture, "logits row width", &seq.name, pos, id as usize + 1, row.len()));
            };
            let (e, a) = (f64::from(want), f64::from(got));
            if !tol.logits.accepts(e, a) {
                let gap = gap_of(e, a);
                if worst.is_none_or(|w| gap > w.gap) {
                    worst = Some(Miss {
                        position: pos,
                        vocab_id: Some(id),
                        expected: e,
                        actual: a,
                        gap,
                        allowed: tol.logits.allowed(e),
                    });
                }
            }
        }
        misses.position(worst);
    }
    misses.into_result(fixture, "top-k", seq)?;
    let views: Vec<_> = actual
        .iter()
        .zip(sums)
        .map(|(row, want)| (checksum_views(want, row.len()), checksum_views(&row_checksums(row), row.len())))
        .collect();
    for k in 0..5 {
        let mut misses = Misses::new(actual.len());
        for (pos, (want, got)) in views.iter().enumerate() {
            let (e, a) = (want[k].1, got[k].1);
            let miss = (!tol.logits.accepts(e, a)).then(|| Miss {
                position: pos,
                vocab_id: None,
                expected: e,
                actual: a,
                gap: gap_of(e, a),
                allowed: tol.logits.allowed(e),
            });
            misses.position(miss);
        }
        let name = views.first().map_or("", |(want, _)| want[k].0);
        misses.into_result(fixture, &format!("checksum {name}"), seq)?;
    }
    Ok(())
}

/// A backend's greedy continuation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Greedy {
    /// The generated ids (EOS not checked).
    pub tokens: Vec<u32>,
    /// The log-probability of each generated token, when the backend can give it; compared with
    /// mlx-lm's up to the first differing token. This catches a wrong cache even when a small
    /// random model repeats one token.
    pub logprobs: Option<Vec<f32>>,
}

impl From<Vec<u32>> for Greedy {
    fn from(tokens: Vec<u32>) -> Self {
        Greedy { tokens, logprobs: None }
    }
}

/// How a greedy comparison ended when it passed.
#[derive(Debug, Clone, PartialEq)]
pub enum GreedyOutcome {
    /// Every token matched.
    Identical,
    /// The tokens matched up to `step`, where mlx-lm itself had a near tie (`margin`), and were
    /// not compared after it.
    NearTie {
        /// The step where the backend chose differently.
        step: usize,
        /// mlx-lm's margin at that step.
        margin: f64,
    },
}

/// Compares a greedy continuation with mlx-lm's.
///
/// # Errors
/// The first differing step (unless mlx-lm's margin there is within [`Tolerances::tie`]), a
/// log-probability out of tolerance before it, or a different number of tokens.
pub fn compare_greedy(
    fixture: &str,
    run: &GreedyRun,
    actual: &Greedy,
    tol: &Tolerances,
) -> Result<GreedyOutcome, Box<Divergence>> {
    let div = |position: usize, gap: Gap, summary: Option<String>| {
        Box::new(Divergence {
            fixture: fixture.to_string(),
            check: "greedy".to_string(),
            case: run.name.clone(),
            position,
            input_token: None,
            gap,
            summary,
        })
    };
    let first_diff = run.tokens.iter().zip(&actual.tokens).position(|(a, b)| a != b);
    let compared = first_diff.unwrap_or(run.tokens.len().min(actual.tokens.len()));
    if let Some(lps) = &actual.logprobs {
        for (step, (&e, &a)) in run.logprobs.iter().zip(lps).take(compared).enumerate() {
            let (e, a) = (f64::from(e), f64::from(a));
            if !tol.logprobs.accepts(e, a) {
                let gap = Gap::Value {
                    vocab_id: run.tokens.get(step).copied(),
                    expected: e,
                    actual: a,
                    gap: gap_of(e, a),
                    allowed: tol.logprobs.allowed(e),
                };
                return Err(div(step, gap, Some("log-probability of the generated token".into())));
            }
        }
    }
    match first_diff {
        Some(step) => {
            let margin = f64::from(run.margins[step]);
            if margin <= tol.tie {
                return Ok(GreedyOutcome::NearTie { step, margin });
            }
            let matched = format!("the first {step} tokens match; mlx-lm continues {:?}", &run.tokens[step..]);
            Err(div(
                step,
                Gap::Token {
                    expected: Some(run.tokens[step]),
                    actual: Some(actual.tokens[step]),
                    margin: Some(margin),
                },
                Some(matched),
            ))
        }
        None if actual.tokens.len() != run.tokens.len() => {
            let step = compared;
            Err(div(
                step,
                Gap::Token {
                    expected: run.tokens.get(step).copied(),
                    actual: actual.tokens.get(step).copied(),
                    margin: None,
                },
                Some(format!("{} tokens where mlx-lm has {}", actual.tokens.len(), run.tokens.len())),
            ))
        }
        None => Ok(GreedyOutcome::Identical),
    }
}

/// Compares two id lists (an encode) and reports the first differing index.
///
/// # Errors
/// The first differing index, or the first index past the shorter list.
pub fn compare_ids(
    fixture: &str,
    check: &str,
    case: &str,
    expected: &[u32],
    actual: &[u32],
) -> Result<(), Box<Divergence>> {
    let first = expected.iter().zip(actual).position(|(a, b)| a != b);
    let position = match first {
        Some(p) => p,
        None if expected.len() == actual.len() => return Ok(()),
        None => expected.len().min(actual.len()),
    };
    Err(Box::new(Divergence {
        fixture: fixture.to_string(),
        check: check.to_string(),
        case: case.to_string(),
        position,
        input_token: None,
        gap: Gap::Token {
            expected: expected.get(position).copied(),
            actual: actual.get(position).copied(),
            margin: None,
        },
        summary: Some(format!("{} ids where the reference has {}", actual.len(), expected.len())),
    }))
}

/// Compares two texts (a decode or a rendered template) and reports the first differing byte.
///
/// # Errors
/// The first differing byte offset.
pub fn compare_text(
    fixture: &str,
    check: &str,
    case: &str,
    expected: &str,
    actual: &str,
) -> Result<(), Box<Divergence>> {
    if expected == actual {
        return Ok(());
    }
    let byte =
        expected.bytes().zip(actual.bytes()).position(|(a, b)| a != b).unwrap_or(expected.len().min(actual.len()));
    Err(Box::new(Divergence {
        fixture: fixture.to_string(),
        check: check.to_string(),
        case: case.to_string(),
        position: byte,
        input_token: None,
        gap: Gap::Text { expected: expected.to_string(), actual: actual.to_string(), byte },
        summary: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_accepts_within_atol_plus_rtol() {
        let t = Tolerance::new(0.1, 0.01);
        assert!(t.accepts(10.0, 10.2));
        assert!(!t.accepts(10.0, 10.21));
        assert!(t.accepts(0.0, -0.1));
        assert!(!t.accepts(1.0, f64::NAN));
        assert!(!t.accepts(f64::NAN, f64::NAN));
        assert!(t.accepts(f64::NEG_INFINITY, f64::NEG_INFINITY));
        assert!(!t.accepts(f64::INFINITY, 1e30));
    }

    #[test]
    fn tolerances_grow_with_coarser_dtypes_and_depth() {
        let f32t = Tolerances::for_dtype("float32", false, Kind::Tiny);
        let f32q = Tolerances::for_dtype("float32", true, Kind::Tiny);
        let bf16 = Tolerances::for_dtype("bfloat16", false, Kind::Tiny);
        let bf16q = Tolerances::for_dtype("bfloat16", true, Kind::Tiny);
        let real = Tolerances::for_dtype("bfloat16", false, Kind::Real);
        assert_eq!(f32t.logits, Tolerance::new(1e-4, 1e-4));
        assert!(f32t.logits.atol < f32q.logits.atol && f32q.logits.atol < bf16.logits.atol);
        assert!(bf16.logits.atol < bf16q.logits.atol && bf16.tie < bf16q.tie);
        assert!(real.logits.atol > bf16.logits.atol && real.logits.rtol > bf16.logits.rtol && real.tie > bf16.tie);
        assert_eq!(Tolerances::for_dtype("mystery", false, Kind::Tiny), bf16);
        assert_eq!(f32t.logprobs.atol, 2.0 * f32t.logits.atol);
    }

    #[test]
    fn checksums_match_a_hand_computation() {
        let c = row_checksums(&[1.0, -2.0, 3.0]);
        assert_eq!((c.sum, c.sum_sq, c.min, c.max, c.argmax), (2.0, 14.0, -2.0, 3.0, 2));
        let lse = (1f64.exp() + (-2f64).exp() + 3f64.exp()).ln();
        assert!((c.logsumexp - lse).abs() < 1e-12);
        assert_eq!(row_checksums(&[0.5, 0.5]).argmax, 0, "ties go to the first id, as numpy's argmax");
    }

    #[test]
    fn ids_and_texts_report_the_first_difference() {
        assert!(compare_ids("f", "encode", "c", &[1, 2, 3], &[1, 2, 3]).is_ok());
        let d = compare_ids("f", "encode", "c", &[1, 2, 3], &[1, 9, 3]).unwrap_err();
        assert_eq!((d.position, &d.gap), (1, &Gap::Token { expected: Some(2), actual: Some(9), margin: None }));
        let d = compare_ids("f", "encode", "c", &[1, 2], &[1, 2, 3]).unwrap_err();
        assert_eq!((d.position, &d.gap), (2, &Gap::Token { expected: None, actual: Some(3), margin: None }));
        let d = compare_text("f", "decode", "c", "héllo wörld", "héllo world").unwrap_err();
        assert_eq!(d.position, 8);
        let shown = d.to_string();
        assert!(shown.contains("byte 8") && shown.contains("world"), "{shown}");
        // A difference inside a multi-byte character still prints.
        let d = compare_text("f", "decode", "c", "日本", "日木").unwrap_err();
        assert!(d.to_string().contains("日木"), "{d}");
    }
}
