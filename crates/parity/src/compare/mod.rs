// SPDX-License-Identifier: EUPL-1.2
//! Tolerances per dtype, the comparisons, and what they report when a backend diverges:
//! - `tolerance`: [`Tolerance`] and the [`Tolerances`] of a fixture;
//! - `divergence`: the first place a backend leaves the reference ([`Divergence`], [`Gap`]);
//! - `logits`: logits in full or as top-k and row checksums ([`compare_logits`],
//!   [`compare_top_k`], [`row_checksums`]);
//! - `greedy`: greedy continuations ([`compare_greedy`]);
//! - `text`: token ids and texts ([`compare_ids`], [`compare_text`]).

mod divergence;
mod greedy;
mod logits;
mod text;
mod tolerance;

pub use divergence::{Divergence, Gap};
pub use greedy::{Greedy, GreedyOutcome, compare_greedy};
pub use logits::{compare_logits, compare_top_k, row_checksums};
pub use text::{compare_ids, compare_text};
pub use tolerance::{Tolerance, Tolerances};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::Kind;

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
