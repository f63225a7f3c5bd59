// SPDX-License-Identifier: EUPL-1.2
//! Token ids (an encode) and texts (a decode or a rendered chat template) against the
//! reference's, reporting the first difference.

use super::divergence::{Divergence, Gap};

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
