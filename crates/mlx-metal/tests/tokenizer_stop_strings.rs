// SPDX-License-Identifier: EUPL-1.2
//! Stop strings: found across chunks and streamed tokens, false starts released, the earliest
//! stop winning, nothing emitted after a stop.

mod text_common;

use mlx_metal::tokenizer::{StopChunk, StopMatcher};
use proptest::prelude::*;
use text_common::*;

/// Feeds `chunks` to a matcher for `stops` until it stops: the text it let through, and whether
/// it stopped (when it did not, what it still held is released at the end).
fn run_stop(stops: &[&str], chunks: &[impl AsRef<str>]) -> (String, bool) {
    let mut m = StopMatcher::new(stops.iter().copied());
    let mut out = String::new();
    for chunk in chunks {
        let StopChunk { text, stopped } = m.push(chunk.as_ref());
        out.push_str(&text);
        if stopped {
            return (out, true);
        }
    }
    out.push_str(&m.finish());
    (out, false)
}

#[test]
fn stop_strings_are_found_across_chunks() {
    assert_eq!(run_stop(&["</s>"], &["Hello <", "/", "s> more"]), ("Hello ".into(), true));
    assert_eq!(run_stop(&["STOP"], &["xST", "OPy"]), ("x".into(), true));
    assert_eq!(run_stop(&["STOP"], &["STOP"]), (String::new(), true));
    assert_eq!(run_stop(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
}

#[test]
fn a_false_start_is_released() {
    assert_eq!(run_stop(&["</s>"], &["a <", "b"]), ("a <b".into(), false));
    assert_eq!(run_stop(&["</s>"], &["a </"]), ("a </".into(), false), "finish releases held text");
    let mut m = StopMatcher::new(["abc"]);
    assert_eq!(m.push("xab").text, "x");
    assert!(m.has_pending());
    assert_eq!(m.push("ab").text, "ab", "the first 'ab' cannot start 'abc' any more");
    assert_eq!(m.push("c"), StopChunk { text: String::new(), stopped: true });
    assert_eq!(m.matched(), Some("abc"));
}

#[test]
fn after_a_stop_nothing_more_is_emitted() {
    let mut m = StopMatcher::new(["x", "", "x"]);
    assert_eq!(m.stops(), ["x"]);
    assert!(m.push("axb").stopped);
    assert!(m.is_stopped());
    assert_eq!(m.push("more"), StopChunk { text: String::new(), stopped: true });
    assert_eq!(m.finish(), "");
    assert!(!m.is_stopped(), "finish starts afresh");
    assert_eq!(m.push("ab").text, "ab");
}

#[test]
fn the_earliest_stop_wins() {
    assert_eq!(run_stop(&["world", "lo w"], &["hello world"]), ("hel".into(), true));
    let mut m = StopMatcher::new(["ab", "abc"]);
    let c = m.push("zabc");
    assert_eq!(c.text, "z");
    assert_eq!(m.matched(), Some("abc"), "at one position the longest wins");
}

#[test]
fn stop_strings_work_on_streamed_tokens() {
    let fx = fixtures();
    let tok = &fx[0].tokenizer;
    let ids = tok.encode("hello world 🦀<|eot_id|> after", false).unwrap();
    let pieces = stream_pieces(&mut tok.stream_decoder(false), &ids);
    assert_eq!(run_stop(&["🦀<|eot"], &pieces), ("hello world ".into(), true));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_stop_matcher_emits_exactly_the_text_before_the_first_stop(
        text in "[ab€ ]{0,24}",
        stop in "[ab€]{1,3}",
        cuts in proptest::collection::vec(0usize..32, 0..8),
    ) {
        let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).filter(|&c| text.is_char_boundary(c)).collect();
        bounds.push(0);
        bounds.push(text.len());
        bounds.sort_unstable();
        let chunks: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
        let (out, stopped) = run_stop(&[stop.as_str()], &chunks);
        match text.find(&stop) {
            Some(pos) => {
                prop_assert!(stopped);
                prop_assert_eq!(out, &text[..pos]);
            }
            None => {
                prop_assert!(!stopped);
                prop_assert_eq!(out, text);
            }
        }
    }
}
