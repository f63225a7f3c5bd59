// SPDX-License-Identifier: EUPL-1.2
//! Property-based fuzzing of the protocol's reading side, inside the crate (its types are
//! private): [`read_line`] on arbitrary bytes and very long lines against a plain model of it,
//! [`parse`] on arbitrary bytes (invalid UTF-8 included), and events built from the protocol's
//! field names through everything that reads them. The end-to-end half, answers from a process,
//! is `tests/fuzz_replay.rs`.

use std::io::BufReader;
use std::time::Duration;

use inference_core::ModelInfo;
use parity::fuzz;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::errors::bridge_error;
use super::pipes::{Incoming, parse};
use crate::lines::{Line, read_line};
use crate::protocol::Event;

const CASES: u32 = 512;

/// Field names and values of the events.
const WORDS: &[&str] = &[
    "id",
    "event",
    "ready",
    "loaded",
    "info",
    "token",
    "done",
    "cancelled",
    "classified",
    "batch",
    "inspected",
    "error",
    "bye",
    "protocol",
    "token_id",
    "logprob",
    "logits",
    "results",
    "tokens",
    "kind",
    "message",
    "operation",
    "cause",
    "model_type",
    "vocab_size",
    "num_layers",
    "hidden_size",
    "quant_bits",
    "quant_group",
    "context_length",
    "compute_dtype",
    "chat_template",
    "num_q_heads",
    "num_kv_heads",
    "seq_len",
    "head_dim",
    "architecture",
    "prompt_tokens",
    "generation_tokens",
    "prompt_time",
    "generation_time",
    "prompt_tps",
    "generation_tps",
    "peak_memory",
    "active_memory",
    "inf",
    "-inf",
    "nan",
    "empty_prompt",
    "unsupported",
    "failed",
    "{% if tools %}<tool_call>{% endif %}",
    "[TOOL_CALLS]",
];

const EVENTS: &[&str] =
    &["ready", "loaded", "info", "token", "done", "cancelled", "classified", "batch", "inspected", "error", "bye"];

/// What [`read_line`] should find in `input` with a limit of `max`: every line split at `\n`, a
/// `\r` before it dropped, a last line without `\n` kept; reading stops at the first line over
/// the limit.
fn model_lines(input: &[u8], max: usize) -> Vec<Line> {
    let mut out = Vec::new();
    let mut rest = input;
    loop {
        if rest.is_empty() {
            out.push(Line::Eof);
            return out;
        }
        let (mut line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        if line.len() > max {
            out.push(Line::TooLong);
            return out;
        }
        out.push(Line::Complete(line.to_vec()));
        rest = next;
    }
}

fn read_all(input: &[u8], max: usize, capacity: usize) -> Vec<Line> {
    let mut reader = BufReader::with_capacity(capacity, input);
    let mut out = Vec::new();
    loop {
        match read_line(&mut reader, max) {
            Ok(line) => {
                let end = matches!(line, Line::Eof | Line::TooLong);
                out.push(line);
                if end {
                    return out;
                }
            }
            Err(e) => panic!("reading from memory failed: {e}"),
        }
    }
}

/// Input made of runs: line ends, carriage returns, arbitrary bytes and long runs of one byte.
fn lines_input() -> impl Strategy<Value = Vec<u8>> {
    let run = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..24),
        2 => prop::sample::select(vec![b"\n".to_vec(), b"\r\n".to_vec(), b"\r".to_vec(), b"\n\n".to_vec()]),
        1 => (any::<u8>(), 0usize..5000).prop_map(|(b, n)| vec![b; n]),
    ];
    prop::collection::vec(run, 0..12).prop_map(|runs| runs.concat())
}

/// Reads every event the way the process and the model do.
fn consume(event: Event) {
    let name = event.name();
    assert!(EVENTS.contains(&name), "{name}");
    if matches!(event, Event::Ready { .. }) {
        assert_eq!(event.id(), None);
    }
    let elapsed = Duration::from_millis(5);
    match event {
        Event::Info { info, .. } => {
            let native = info.chat_template.as_deref().is_some_and(inference_core::tools::template_supports_tools);
            let info: ModelInfo = (*info).into();
            let _ = (native, info);
        }
        Event::Token { token, .. } => {
            let _ = token.into_token();
        }
        Event::Done { stats, .. } => check_metrics(stats.metrics(elapsed)),
        Event::Classified { results, stats, .. } => {
            let _: Vec<_> = results.into_iter().map(crate::protocol::WireToken::into_parts).collect();
            check_metrics(stats.metrics(elapsed));
        }
        Event::Batch { results, stats, .. } => {
            for r in results {
                let _: Vec<_> = r.tokens.into_iter().map(crate::protocol::WireToken::into_token).collect();
                if let Some(e) = r.error {
                    assert!(!bridge_error(e).report().is_empty());
                }
            }
            check_metrics(stats.metrics(elapsed));
        }
        Event::Error { error, .. } => assert!(!bridge_error(error).report().is_empty()),
        _ => {}
    }
}

/// Metrics from arbitrary stats: durations and rates are never negative or NaN.
fn check_metrics(m: inference_core::GenerateMetrics) {
    assert!(m.prefill_tokens_per_sec >= 0.0 && m.prefill_tokens_per_sec.is_finite());
    assert!(m.decode_tokens_per_sec >= 0.0 && m.decode_tokens_per_sec.is_finite());
    assert_eq!(m.total_duration, Duration::from_millis(5));
}

proptest! {
    #![proptest_config(fuzz::config(CASES))]

    #[test]
    fn lines_are_read_as_a_plain_split_would(input in lines_input(), max in 0usize..64, capacity in 1usize..96) {
        prop_assert_eq!(read_all(&input, max, capacity), model_lines(&input, max));
    }

    #[test]
    fn long_lines_stop_at_the_limit(len in 0usize..200_000, max in prop_oneof![0usize..16, 60_000usize..70_000], cr in any::<bool>()) {
        let mut input = vec![b'x'; len];
        if cr {
            input.push(b'\r');
        }
        input.extend_from_slice(b"\nnext\n");
        prop_assert_eq!(read_all(&input, max, 64 * 1024), model_lines(&input, max));
    }

    #[test]
    fn arbitrary_lines_parse_or_are_excerpted(line in prop::collection::vec(any::<u8>(), 0..600)) {
        match parse(&line) {
            Incoming::Event(e) => consume(*e),
            Incoming::Malformed { excerpt, error } => {
                prop_assert!(excerpt.chars().count() <= 201, "{} chars", excerpt.chars().count());
                prop_assert!(!error.is_empty());
            }
            other => prop_assert!(false, "parse gave {:?}", other),
        }
    }

    #[test]
    fn events_of_any_shape_parse_or_are_refused(
        name in prop::sample::select(EVENTS),
        id in prop_oneof![Just(json!(7)), fuzz::json_value(WORDS)],
        fields in fuzz::json_object(WORDS),
    ) {
        let mut event = fields;
        if let Some(o) = event.as_object_mut() {
            o.insert("event".into(), Value::from(name));
            o.insert("id".into(), id);
        }
        let line = serde_json::to_vec(&event).unwrap_or_default();
        match parse(&line) {
            Incoming::Event(e) => {
                prop_assert_eq!(e.name(), name);
                consume(*e);
            }
            Incoming::Malformed { error, .. } => prop_assert!(!error.is_empty()),
            other => prop_assert!(false, "parse gave {:?}", other),
        }
    }
}
