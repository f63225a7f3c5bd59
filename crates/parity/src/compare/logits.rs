// SPDX-License-Identifier: EUPL-1.2
//! Logits against the golden's: every value for tiny models, top-k values, the top-1 choice and
//! row checksums for real ones.

use super::divergence::{Divergence, Gap, gap_of};
use super::tolerance::Tolerances;
use crate::golden::{RowChecksums, Sequence, TopK};

#[derive(Clone, Copy)]
struct Miss {
    position: usize,
    vocab_id: Option<u32>,
    expected: f64,
    actual: f64,
    gap: f64,
    allowed: f64,
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
