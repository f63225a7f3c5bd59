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
//! variable is unset or the files are absent.

use std::path::{Path, PathBuf};

use inference_core::Message;
use mlx_metal::chat::ChatTemplate;
use mlx_metal::tokenizer::Tokenizer;
use serde_json::Value;

const TOKENIZER_FORMAT: &str = "mlxr-tokenizer-golden/1";
const MODEL_FORMAT: &str = "mlxr-golden/1";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tokeniser goldens (`tokenizer-*.json`), or with `tokenizer` false every other golden.
fn goldens(tokenizer: bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(workspace().join("testdata/golden")) else { return Vec::new() };
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

    fn finish(self, files: usize, what: &str) {
        eprintln!("{files} {what} goldens, {} checks", self.checks);
        assert!(
            self.failures.is_empty(),
            "{} of {} checks differ from the goldens:\n{}",
            self.failures.len(),
            self.checks,
            self.failures.join("\n")
        );
    }
}

/// Reads each golden that [`goldens`] lists and hands it to `check`, which says whether it used
/// the golden (or skipped it); then fails with every check that differed, after saying how many
/// goldens were used.
fn check_goldens(tokenizer: bool, what: &str, mut check: impl FnMut(&mut Report, &Path, &Value) -> bool) {
    let mut report = Report::default();
    let mut used = 0;
    for file in goldens(tokenizer) {
        let doc = read(&file);
        if check(&mut report, &file, &doc) {
            used += 1;
        }
    }
    report.finish(used, what);
}

#[test]
fn tokenizer_goldens_match_hugging_face() {
    check_goldens(true, "tokenizer", |report, file, doc| {
        assert_eq!(str_field(doc, "format", file), TOKENIZER_FORMAT, "{}", file.display());
        let Some(path) = resolve(str_field(doc, "tokenizer_file", file)) else {
            eprintln!("skipping {}: its tokenizer.json is not here", file.display());
            return false;
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
        true
    });
}

#[test]
fn chat_goldens_match_transformers() {
    check_goldens(false, "chat", |report, file, doc| {
        if doc.get("format").and_then(Value::as_str) != Some(MODEL_FORMAT) {
            return false;
        }
        let Some(cases) = doc.get("chat").and_then(Value::as_array).filter(|c| !c.is_empty()) else { return false };
        let Some(dir) = resolve(str_field(doc, "model_dir", file)) else {
            eprintln!("skipping {}: its model is not here", file.display());
            return false;
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
        true
    });
}
