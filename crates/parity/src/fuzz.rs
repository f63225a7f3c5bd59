// SPDX-License-Identifier: EUPL-1.2
//! Support for the property-based fuzz targets (feature `fuzz`): one proptest configuration,
//! strategies for JSON values with a format's own field names mixed in, mutations of a valid
//! JSON document, and mutations of a file's bytes.
//!
//! The fuzz targets are ordinary `cargo test` tests that run a bounded number of cases on every
//! run (CI's included). `PROPTEST_CASES=N` raises the count for a long run by hand. Failures are
//! not persisted (`failure_persistence: None`): nothing is written into the source tree, and a
//! crash a target finds is kept as a named regression test with its exact input instead.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Number, Value};

/// The configuration of every fuzz target: `cases` cases (or `PROPTEST_CASES` when set), no
/// failure persistence, and shrinking bounded so that a failure is reported in seconds.
pub fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    Config { cases, failure_persistence: None, max_shrink_iters: 2048, ..Config::default() }
}

/// A test runner with [`config`].
pub fn runner(cases: u32) -> TestRunner {
    TestRunner::new(config(cases))
}

/// Runs `test` on `cases` values of `strategy` (see [`config`]) and panics with the smallest
/// failing input when one fails or panics.
pub fn check<S: Strategy>(cases: u32, strategy: &S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    if let Err(e) = runner(cases).run(strategy, test) {
        panic!("{e}");
    }
}

/// Numbers a format's reader may choke on: small counts, zero and negatives, the edges of
/// `i32`, `u32`, `i64` and `u64`, fractions, huge and tiny floats, and anything at all.
pub fn json_number() -> impl Strategy<Value = Value> {
    let edges: Vec<Value> = vec![
        0.into(),
        1.into(),
        (-1).into(),
        2.into(),
        4.into(),
        i64::from(i32::MAX).into(),
        (i64::from(i32::MAX) + 1).into(),
        i64::from(i32::MIN).into(),
        u64::from(u32::MAX).into(),
        i64::MAX.into(),
        i64::MIN.into(),
        u64::MAX.into(),
        (1u64 << 53).into(),
        float(0.5),
        float(-0.0),
        float(1e-12),
        float(1e308),
        float(-1e308),
        float(f64::from(f32::MAX) * 2.0),
    ];
    prop_oneof![
        4 => (-3i64..300).prop_map(Value::from),
        2 => proptest::sample::select(edges),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(float),
    ]
}

/// A JSON number for `x`, or `null` when JSON has none (NaN and the infinities).
fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Strings: `words` (the format's names and values), empty, any text, long runs.
pub fn json_string(words: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(words).prop_map(str::to_owned),
        2 => "\\PC{0,12}",
        1 => Just(String::new()),
        1 => any::<String>(),
        1 => (proptest::sample::select(words), 1usize..2000).prop_map(|(w, n)| w.repeat(n)),
    ]
}

/// Any JSON value up to four levels deep, whose objects' keys are mostly `words` and whose
/// strings are often `words` too.
pub fn json_value(words: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        json_string(words).prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        let key = prop_oneof![3 => proptest::sample::select(words).prop_map(str::to_owned), 1 => "[a-z_]{0,10}"];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// An object of `words` keys (and a few others) with any values: the shape of a request or a
/// config file, with each field of any type.
pub fn json_object(words: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![5 => proptest::sample::select(words).prop_map(str::to_owned), 1 => "[a-z_]{0,10}"];
    prop::collection::vec((key, json_value(words)), 0..12)
        .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<String, Value>>()))
}

/// One change to a JSON document (see [`apply_edit`]).
#[derive(Debug, Clone)]
pub enum JsonEdit {
    /// Replace the value found by the path with a new one.
    Replace(Vec<usize>, Value),
    /// Remove the member or element found by the path.
    Remove(Vec<usize>),
    /// Add a member (to an object) or an element (to an array) where the path leads.
    Insert(Vec<usize>, String, Value),
}

/// `base` with one to `max_edits` edits applied: values replaced by any JSON (with `words` in
/// it), members removed, members added; a path picks a child at each level by index modulo the
/// number of children, so every path leads somewhere.
pub fn mutated_json(base: Value, words: &'static [&'static str], max_edits: usize) -> impl Strategy<Value = Value> {
    let path = prop::collection::vec(any::<usize>(), 0..5);
    let key = prop_oneof![3 => proptest::sample::select(words).prop_map(str::to_owned), 1 => "[a-z_]{0,10}"];
    let edit = prop_oneof![
        4 => (path.clone(), json_value(words)).prop_map(|(p, v)| JsonEdit::Replace(p, v)),
        1 => path.clone().prop_map(JsonEdit::Remove),
        1 => (path, key, json_value(words)).prop_map(|(p, k, v)| JsonEdit::Insert(p, k, v)),
    ];
    prop::collection::vec(edit, 1..=max_edits.max(1)).prop_map(move |edits| {
        let mut doc = base.clone();
        for e in &edits {
            apply_edit(&mut doc, e);
        }
        doc
    })
}

/// Applies `edit` to `doc` (see [`mutated_json`]).
pub fn apply_edit(doc: &mut Value, edit: &JsonEdit) {
    match edit {
        JsonEdit::Replace(path, v) => *walk(doc, path) = v.clone(),
        JsonEdit::Remove(path) => {
            let Some((last, parent)) = path.split_last() else { return };
            match walk(doc, parent) {
                Value::Object(o) if !o.is_empty() => {
                    let key = o.keys().nth(last % o.len()).cloned().unwrap_or_default();
                    o.remove(&key);
                }
                Value::Array(a) if !a.is_empty() => {
                    let i = last % a.len();
                    a.remove(i);
                }
                _ => {}
            }
        }
        JsonEdit::Insert(path, key, v) => match walk(doc, path) {
            Value::Object(o) => {
                o.insert(key.clone(), v.clone());
            }
            Value::Array(a) => a.push(v.clone()),
            other => *other = v.clone(),
        },
    }
}

/// The value `path` leads to (it stops early at a leaf or an empty container).
fn walk<'a>(doc: &'a mut Value, path: &[usize]) -> &'a mut Value {
    let Some((first, rest)) = path.split_first() else { return doc };
    let n = match &*doc {
        Value::Object(o) => o.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if n == 0 {
        return doc;
    }
    match doc {
        Value::Object(o) => {
            let key = o.keys().nth(first % n).cloned().unwrap_or_default();
            // The key is a member's, so nothing is inserted.
            walk(o.entry(key).or_insert(Value::Null), rest)
        }
        Value::Array(a) => walk(&mut a[first % n], rest),
        other => other,
    }
}

/// One change to a file's bytes (see [`apply_bytes`]).
#[derive(Debug, Clone)]
pub enum ByteEdit {
    /// Keep only the first `n` bytes (modulo the length).
    Truncate(usize),
    /// XOR the byte at `at` (modulo the length) with a non-zero mask.
    Flip(usize, u8),
    /// Overwrite bytes from `at` (modulo the length) with these.
    Overwrite(usize, Vec<u8>),
    /// Insert these bytes at `at` (modulo the length + 1).
    Insert(usize, Vec<u8>),
}

/// One to `max_edits` byte edits.
pub fn byte_edits(max_edits: usize) -> impl Strategy<Value = Vec<ByteEdit>> {
    let edit = prop_oneof![
        1 => any::<usize>().prop_map(ByteEdit::Truncate),
        4 => (any::<usize>(), 1u8..=255).prop_map(|(at, m)| ByteEdit::Flip(at, m)),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, b)| ByteEdit::Overwrite(at, b)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, b)| ByteEdit::Insert(at, b)),
    ];
    prop::collection::vec(edit, 1..=max_edits.max(1))
}

/// `bytes` with `edits` applied in order; `range` limits where edits land (`start..end` of the
/// original bytes, clamped), so a target can aim at a header.
pub fn apply_bytes(bytes: &[u8], edits: &[ByteEdit], range: std::ops::Range<usize>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for e in edits {
        let start = range.start.min(out.len());
        let span = range.end.min(out.len()).saturating_sub(start);
        let at = |i: usize| if span == 0 { start } else { start + i % span };
        match e {
            ByteEdit::Truncate(n) => out.truncate(if out.is_empty() { 0 } else { n % out.len() }),
            ByteEdit::Flip(i, m) if !out.is_empty() && span > 0 => {
                let i = at(*i);
                out[i] ^= m;
            }
            ByteEdit::Overwrite(i, b) if span > 0 => {
                let i = at(*i);
                let end = (i + b.len()).min(out.len());
                out[i..end].copy_from_slice(&b[..end - i]);
            }
            ByteEdit::Insert(i, b) => {
                let i = if span == 0 { start } else { start + i % (span + 1) };
                out.splice(i..i, b.iter().copied());
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn edits_land_somewhere_and_keep_json_valid() {
        let mut doc = json!({"a": [1, {"b": 2}], "c": "x"});
        apply_edit(&mut doc, &JsonEdit::Replace(vec![0, 1, 0], json!(null)));
        assert_eq!(doc, json!({"a": [1, {"b": null}], "c": "x"}));
        apply_edit(&mut doc, &JsonEdit::Remove(vec![1]));
        assert_eq!(doc, json!({"a": [1, {"b": null}]}));
        apply_edit(&mut doc, &JsonEdit::Insert(vec![0], "k".into(), json!(3)));
        assert_eq!(doc, json!({"a": [1, {"b": null}, 3]}));
        apply_edit(&mut doc, &JsonEdit::Remove(vec![]));
        assert_eq!(doc, json!({"a": [1, {"b": null}, 3]}), "the root cannot be removed");
    }

    #[test]
    fn byte_edits_stay_in_range() {
        let bytes: Vec<u8> = (0..10).collect();
        let out = apply_bytes(&bytes, &[ByteEdit::Flip(13, 0xff)], 2..6);
        assert_eq!(out[3], 3 ^ 0xff);
        assert_eq!(apply_bytes(&bytes, &[ByteEdit::Truncate(14)], 0..10).len(), 4);
        let out = apply_bytes(&bytes, &[ByteEdit::Overwrite(3, vec![9; 20])], 0..10);
        assert_eq!(&out[..3], &[0, 1, 2]);
        assert!(out[3..].iter().all(|&b| b == 9));
        assert_eq!(apply_bytes(&[], &[ByteEdit::Flip(1, 1), ByteEdit::Insert(5, vec![7])], 0..0), vec![7]);
    }
}
