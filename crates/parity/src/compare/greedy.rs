// SPDX-License-Identifier: EUPL-1.2
//! Greedy continuations against mlx-lm's: tokens up to the first near tie of the reference, and
//! their log-probabilities.

use super::divergence::{Divergence, Gap, gap_of};
use super::tolerance::Tolerances;
use crate::golden::GreedyRun;

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
