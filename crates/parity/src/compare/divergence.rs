// SPDX-License-Identifier: EUPL-1.2
//! What a comparison reports: the first place a backend's output leaves the reference
//! ([`Divergence`]) and what differed there ([`Gap`]).

use std::fmt;

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

/// `|actual - expected|`, infinite when either is not finite.
pub(super) fn gap_of(expected: f64, actual: f64) -> f64 {
    if expected.is_finite() && actual.is_finite() { (actual - expected).abs() } else { f64::INFINITY }
}
