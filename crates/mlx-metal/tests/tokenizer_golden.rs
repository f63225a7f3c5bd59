// SPDX-License-Identifier: EUPL-1.2
//! Parity with Hugging Face `tokenizers` (Python) and `transformers`, from the goldens that
//! `xtask/fixtures/make_goldens.py` writes into `testdata/golden/` (format in `testdata/README.md`):
//!
//! - every `tokenizer-<name>.json` (`mlxr-tokenizer-golden/1`): for each text of
//!   `testdata/tokenizer_corpus.json`, `encode` with and without special tokens must give the
//!   golden ids, `decode` of the ids with special tokens (skipping them or not) the golden text,
//!   and the streaming decoder must add up to that same text;
//! - every model golden `<model>.json` (`mlxr-golden/1`) with `chat` cases: the model's chat
//!   template must render the golden text (`apply_chat_template(..., tokenize=False)`), which
//!   must encode (without special tokens) to the golden ids, and `encode_prompt` must not add a
//!   second BOS.
//!
//! Paths in goldens are relative to the workspace root; `$MLXR_MODELS/...` (real models that
//! are not committed) is expanded from the environment, and such goldens are skipped when the
//! models are absent, unless `MLXR_REQUIRE_REAL_MODELS` is set (`parity::real_models_required`),
//! which makes a skipped golden a failure. Each test says how many goldens it used and how many
//! checks it made, and fails when it checked nothing (no goldens found, or all skipped).
//! `MLXR_TESTDATA_DIR` moves `testdata/` (as everywhere in the workspace).

use std::path::{Path, PathBuf};

use inference_core::Message;
use mlx_metal::chat::ChatTemplate;
use mlx_metal::tokenizer::Tokenizer;
use serde_json::Value;

const TOKENIZER_FORMAT: &str = "mlxr-tokenizer-golden/1";
const MODEL_FORMAT: &str = "mlxr-golden/1";

fn workspace() -> PathBuf {
    parity::workspace_root()
}

/// The tokeniser goldens (`tokenizer-*.json`), or with `tokenizer` false every other golden.
fn goldens(tokenizer: bool) -> Vec<PathBuf> {
    let dir = parity::golden_dir();
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list the goldens in {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".json") && name.starts_with("tokenizer-") == tokenizer
        })
        .collect();
    files.sort();
    files
}

fn read(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A path recorded in a golden: relative to the workspace, or under `$MLXR_MODELS`. `None` when
/// it points at real models that are not here.
fn resolve(recorded: &str) -> Option<PathBuf> {
    let path = match recorded.strip_prefix("$MLXR_MODELS/") {
        Some(rest) => parity::models_dir()?.join(rest),
        None => workspace().join(recorded),
    };
    path.exists().then_some(path)
}

fn str_field<'a>(doc: &'a Value, key: &str, file: &Path) -> &'a str {
    doc.get(key).and_then(Value::as_str).unwrap_or_else(|| panic!("{}: no string `{key}`", file.display()))
}

fn ids(doc: &Value, key: &str, what: &str) -> Vec<u32> {
    doc.get(key)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{what}: no list `{key}`"))
        .iter()
        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or_else(|| panic!("{what}: {x} is not an id")))
        .collect()
}

fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> String {
    let mut dec = tok.stream_decoder(skip);
    let mut out = String::new();
    for &id in ids {
        out.push_str(&dec.push(id).unwrap());
    }
    out.push_str(&dec.finish().unwrap());
    out
}

/// Collects mismatches so that one run reports all of them.
#[derive(Default)]
struct Report {
    checks: usize,
    failures: Vec<String>,
}

impl Report {
    fn check<T: PartialEq + std::fmt::Debug>(&mut self, label: &str, got: T, want: T) {
        self.checks += 1;
        if got != want {
            self.failures.push(format!("{label}:\n    got  {got:?}\n    want {want:?}"));
        }
    }

    /// Fails when a golden differed, when nothing was checked, and (with
    /// `MLXR_REQUIRE_REAL_MODELS`) when a golden was skipped for want of its files.
    fn finish(self, used: usize, missing: &[String], what: &str) {
        eprintln!(
            "{used} {what} goldens used, {} skipped for want of their files, {} checks",
            missing.len(),
            self.checks
        );
        assert!(
            used > 0 && self.checks > 0,
            "the {what} goldens checked nothing ({used} used, {} checks; skipped: {missing:?}); run `cargo xtask \
             fixtures` or set MLXR_TESTDATA_DIR",
            self.checks
        );
        assert!(
            missing.is_empty() || !parity::real_models_required(),
            "{} is set but {} {what} goldens were skipped:\n{}",
            parity::REQUIRE_REAL_MODELS_ENV,
            missing.len(),
            missing.join("\n")
        );
        assert!(
            self.failures.is_empty(),
            "{} of {} checks differ from the goldens:\n{}",
            self.failures.len(),
            self.checks,
            self.failures.join("\n")
        );
    }
}

/// What a check made of one golden.
enum Used {
    /// Checked.
    Yes,
    /// Not a golden of this kind (a model golden without chat cases).
    NotThisKind,
    /// Skipped: the files it was made from are not here (why).
    Missing(String),
}

/// Reads each golden that [`goldens`] lists and hands it to `check`, which says whether it used
/// the golden; then fails with every check that differed, after saying how many goldens were
/// used (see [`Report::finish`]).
fn check_goldens(tokenizer: bool, what: &str, mut check: impl FnMut(&mut Report, &Path, &Value) -> Used) {
    let mut report = Report::default();
    let (mut used, mut missing) = (0, Vec::new());
    for file in goldens(tokenizer) {
        let doc = read(&file);
        match check(&mut report, &file, &doc) {
            Used::Yes => used += 1,
            Used::NotThisKind => {}
            Used::Missing(why) => {
                eprintln!("skipping {}: {why}", file.display());
                missing.push(format!("{}: {why}", file.display()));
            }
        }
    }
    report.finish(used, &missing, what);
}

#[test]
fn tokenizer_goldens_match_hugging_face() {
    check_goldens(true, "tokenizer", |report, file, doc| {
        assert_eq!(str_field(doc, "format", file), TOKENIZER_FORMAT, "{}", file.display());
        let Some(path) = resolve(str_field(doc, "tokenizer_file", file)) else {
            return Used::Missing("its tokenizer.json is not here".into());
        };
        let tok = Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if let Some(size) = doc.get("vocab_size").and_then(Value::as_u64) {
            report.check(&format!("{} vocab_size", file.display()), tok.vocab_size() as u64, size);
        }
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let cases = doc.get("cases").and_then(Value::as_array).unwrap_or_else(|| panic!("{name}: no `cases`"));
        assert!(!cases.is_empty(), "{name}: no cases");
        for (i, case) in cases.iter().enumerate() {
            let text = str_field(case, "text", file);
            let label = format!("{name} case {i} {text:?}");
            let plain = ids(case, "ids", &label);
            let special = ids(case, "ids_with_special", &label);
            report.check(
                &format!("{label}: encode(add_special_tokens=False)"),
                tok.encode(text, false).unwrap(),
                plain,
            );
            report.check(
                &format!("{label}: encode(add_special_tokens=True)"),
                tok.encode(text, true).unwrap(),
                special.clone(),
            );
            for (key, skip) in [("decoded", false), ("decoded_skip_special", true)] {
                let want = str_field(case, key, file).to_string();
                report.check(
                    &format!("{label}: decode(skip_special_tokens={skip})"),
                    tok.decode(&special, skip).unwrap(),
                    want.clone(),
                );
                report.check(
                    &format!("{label}: stream(skip_special_tokens={skip})"),
                    stream(&tok, &special, skip),
                    want,
                );
            }
            if let Some(tokens) = case.get("tokens").and_then(Value::as_array) {
                let got: Vec<Option<String>> = ids(case, "ids", &label).iter().map(|&id| tok.id_to_token(id)).collect();
                let want: Vec<Option<String>> = tokens.iter().map(|t| t.as_str().map(str::to_string)).collect();
                report.check(&format!("{label}: tokens"), got, want);
            }
        }
        Used::Yes
    });
}

#[test]
fn chat_goldens_match_transformers() {
    check_goldens(false, "chat", |report, file, doc| {
        if doc.get("format").and_then(Value::as_str) != Some(MODEL_FORMAT) {
            return Used::NotThisKind;
        }
        let Some(cases) = doc.get("chat").and_then(Value::as_array).filter(|c| !c.is_empty()) else {
            return Used::NotThisKind;
        };
        let Some(dir) = resolve(str_field(doc, "model_dir", file)) else {
            return Used::Missing("its model is not here".into());
        };
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let tok = Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let template =
            ChatTemplate::for_model(&tok, str_field(doc, "model_type", file)).unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in cases {
            let label = format!("{name} chat {}", case.get("name").and_then(Value::as_str).unwrap_or("?"));
            let messages: Vec<Message> =
                serde_json::from_value(case["messages"].clone()).unwrap_or_else(|e| panic!("{label}: messages: {e}"));
            let gen_prompt = case.get("add_generation_prompt").and_then(Value::as_bool).unwrap_or(true);
            let want_text = str_field(case, "text", file);
            let want_ids = ids(case, "ids", &label);
            match template.render(&messages, gen_prompt) {
                Ok(text) => report.check(&format!("{label}: rendered text"), text.as_str(), want_text),
                Err(e) => report.check(&format!("{label}: render"), Err(e.to_string()), Ok(())),
            }
            report.check(
                &format!("{label}: encode(text, false)"),
                tok.encode(want_text, false).unwrap(),
                want_ids.clone(),
            );
            if let Some(bos) = tok.bos_id() {
                let prompt = tok.encode_prompt(want_text).unwrap();
                let count = prompt.iter().take(2).filter(|&&i| i == bos).count();
                report.check(&format!("{label}: BOS count at the start of encode_prompt"), count.min(1), count);
            }
        }
        Used::Yes
    });
}

/// Runs this test binary's `test` alone with `env` set, and says whether it passed, with its
/// output.
fn run_alone(test: &str, env: &[(&str, &std::ffi::OsStr)]) -> (bool, String) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied())
        .output()
        .expect("the test binary runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

const TESTS: [&str; 2] = ["tokenizer_goldens_match_hugging_face", "chat_goldens_match_transformers"];

#[test]
fn no_goldens_is_a_failure_not_a_pass() {
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir(empty.path().join("golden")).unwrap();
    for test in TESTS {
        let (passed, out) = run_alone(test, &[("MLXR_TESTDATA_DIR", empty.path().as_os_str())]);
        assert!(!passed, "{test} passed with no goldens:\n{out}");
        assert!(out.contains("goldens checked nothing (0 used, 0 checks"), "{test}:\n{out}");
    }
    // A testdata directory without goldens at all is named.
    let (passed, out) = run_alone(TESTS[0], &[("MLXR_TESTDATA_DIR", std::ffi::OsStr::new("/nonexistent/testdata"))]);
    assert!(!passed && out.contains("cannot list the goldens in /nonexistent/testdata/golden"), "{out}");
}

#[test]
fn missing_real_models_fail_only_when_required() {
    let none = tempfile::tempdir().unwrap();
    let models = ("MLXR_MODELS_DIR", none.path().as_os_str());
    for test in TESTS {
        let (passed, out) = run_alone(test, &[models, ("MLXR_REQUIRE_REAL_MODELS", "1".as_ref())]);
        assert!(!passed, "{test} passed without the real models it requires:\n{out}");
        assert!(out.contains("MLXR_REQUIRE_REAL_MODELS is set but"), "{test}:\n{out}");
        let (passed, out) = run_alone(test, &[models, ("MLXR_REQUIRE_REAL_MODELS", "0".as_ref())]);
        assert!(passed, "{test} failed with the real models optional:\n{out}");
        assert!(!out.contains(" 0 skipped for want of their files"), "{test} skipped nothing:\n{out}");
    }
}
