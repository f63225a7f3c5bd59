// SPDX-License-Identifier: EUPL-1.2
//! Session files and prompt-cache files (`mlx_metal::session`): files saved from gemma3-tiny
//! (full-attention and sliding-window layers, the windows wrapped or not), their metadata and
//! tensors mutated and their bytes edited, then loaded. A file that loads must hold caches the
//! model can continue from: a turn that extends the tokens, and one that diverges (a trim), run
//! or fail with an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mlx::{Array, io};
use mlx_metal::cache::{BatchKvCache, LayerCache};
use mlx_metal::model::{LanguageModel, LoadedModel};
use mlx_metal::session::{self, Fingerprint, LayerSpec, SessionCache};
use parity::fuzz;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use crate::common::tiny_model;
use crate::{TensorEdit, expect_message, fail, run_step, tensor_edit};

const CASES: u32 = 128;

/// The prompt-cache entries' origin in these tests.
const ORIGIN: &str = "base";

/// Names and values of the files' metadata.
const WORDS: &[&str] = &[
    "kind",
    "standard",
    "rotating",
    "row",
    "offset",
    "max_size",
    "keep",
    "position",
    "window",
    "architecture",
    "num_layers",
    "hidden_size",
    "vocab_size",
    "config_hash",
    "dtype",
    "bfloat16",
    "float32",
    "gemma3_text",
    "mlxr-session",
    "1",
    "2",
];

const META_KEYS: &[&str] = &["format", "version", "model", "tokens", "layers", "origin"];

/// gemma3-tiny with three saved files: a session whose windows wrapped (20 tokens), one whose
/// did not (5 tokens), and a prompt-cache entry of the latter.
struct Setup {
    loaded: LoadedModel,
    fingerprint: Fingerprint,
    specs: Vec<LayerSpec>,
    bases: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let loaded = mlx_metal::model::load(&tiny_model("gemma3-tiny")).unwrap();
        let model = loaded.model.as_ref();
        let fingerprint = Fingerprint::new(model.description(), b"{}");
        let dir = tempfile::tempdir().unwrap();
        let mut bases = Vec::new();
        let mut specs = Vec::new();
        for n in [20u32, 5] {
            let ids: Vec<u32> = (1..=n).map(|i| i * 7 % 300).collect();
            let mut cache = SessionCache::new(model).unwrap();
            feed(model, cache.caches_mut(), &ids).unwrap();
            cache.record(model, &ids, &[]).unwrap();
            assert_eq!(cache.tokens(), ids);
            let path = dir.path().join(format!("session-{n}.safetensors"));
            cache.save(&path, &fingerprint).unwrap();
            bases.push(path);
        }
        // A prompt-cache entry from the short session's tensors.
        let short = io::load_safetensors(&bases[1]).unwrap();
        let kinds: Vec<Value> = serde_json::from_str(&short.metadata["layers"]).unwrap();
        let mut rows = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let k = short.tensors[&format!("layers.{i}.keys")].clone();
            let v = short.tensors[&format!("layers.{i}.values")].clone();
            let window = kind.get("max_size").and_then(Value::as_i64).map(|w| w as i32);
            let s = k.shape();
            specs.push(LayerSpec { heads: s[1], dim: s[3], dtype: k.dtype(), window });
            rows.push(LayerCache::Batch(BatchKvCache::from_row(k, v, 5, window).unwrap()));
        }
        let tokens: Vec<u32> = (1..=5).map(|i| i * 7 % 300).collect();
        let path = dir.path().join("rows.safetensors");
        session::save_rows(&path, &fingerprint, ORIGIN, &tokens, &rows).unwrap();
        bases.push(path);
        assert!(session::load_rows(&bases[2], &fingerprint, ORIGIN, &specs).is_ok());
        Setup { loaded, fingerprint, specs, bases, _dir: dir }
    }

    fn model(&self) -> &dyn LanguageModel {
        self.loaded.model.as_ref()
    }
}

/// Feeds `ids` through the model into `caches`.
fn feed(model: &dyn LanguageModel, caches: &mut [LayerCache], ids: &[u32]) -> mlx::Result<()> {
    let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let inputs = Array::from_slice(&ids, &[1, ids.len() as i32])?;
    model.forward(&inputs, caches)?.eval()
}

/// Loads `path` both ways (as a session and as a prompt-cache entry) and, where it loads, uses
/// what came back.
fn check_file(setup: &Setup, path: &Path) -> Result<(), TestCaseError> {
    let model = setup.model();
    match SessionCache::load(path, model, &setup.fingerprint) {
        Ok(session) => use_session(model, session)?,
        Err(e) => expect_message(&e)?,
    }
    match session::load_rows(path, &setup.fingerprint, ORIGIN, &setup.specs) {
        Ok((tokens, mut rows)) => {
            prop_assert_eq!(rows.len(), setup.specs.len());
            prop_assert!(rows.iter().all(|r| r.offset() >= 0), "negative offsets from {} tokens", tokens.len());
            run_step(model, Some(&mut rows))?;
        }
        Err(e) => expect_message(&e)?,
    }
    Ok(())
}

/// A loaded session continues (two more tokens) and diverges (half its tokens and another).
fn use_session(model: &dyn LanguageModel, mut session: SessionCache) -> Result<(), TestCaseError> {
    let tokens = session.tokens().to_vec();
    prop_assert!(session.caches_mut().iter().all(|c| c.offset() as usize == tokens.len()));
    for ids in [[&tokens[..], &[3, 4]].concat(), [&tokens[..tokens.len() / 2], &[9]].concat()] {
        let cached = match session.prepare(model, &ids) {
            Ok(n) => n,
            Err(e) => return expect_message(&e),
        };
        prop_assert!(cached < ids.len());
        match feed(model, session.caches_mut(), &ids[cached..]) {
            Ok(()) => session.record(model, &ids, &[]).map_err(fail)?,
            Err(e) => return expect_message(&e),
        }
    }
    Ok(())
}

/// One change to a file's parts.
#[derive(Debug, Clone)]
enum Edit {
    /// A metadata entry's JSON mutated.
    Json(usize, Vec<fuzz::JsonEdit>),
    /// A metadata entry replaced with any text.
    Text(usize, String),
    /// A metadata entry removed.
    DropMeta(usize),
    /// A tensor changed.
    Tensor(TensorEdit),
}

fn json_edits() -> impl Strategy<Value = Vec<fuzz::JsonEdit>> {
    let path = prop::collection::vec(any::<usize>(), 0..4);
    let edit = prop_oneof![
        4 => (path.clone(), fuzz::json_value(WORDS)).prop_map(|(p, v)| fuzz::JsonEdit::Replace(p, v)),
        1 => path.clone().prop_map(fuzz::JsonEdit::Remove),
        1 => (path, proptest::sample::select(WORDS), fuzz::json_value(WORDS))
            .prop_map(|(p, k, v)| fuzz::JsonEdit::Insert(p, k.to_owned(), v)),
    ];
    prop::collection::vec(edit, 1..3)
}

fn edit() -> impl Strategy<Value = Edit> {
    let meta = 0..META_KEYS.len();
    prop_oneof![
        4 => (meta.clone(), json_edits()).prop_map(|(k, e)| Edit::Json(k, e)),
        1 => (meta.clone(), fuzz::json_string(WORDS)).prop_map(|(k, s)| Edit::Text(k, s)),
        1 => meta.prop_map(Edit::DropMeta),
        6 => tensor_edit("layers\\.[0-9]\\.(keys|values)").prop_map(Edit::Tensor),
    ]
}

/// `base` with `edits` applied, saved at `out`.
fn write_edited(base: &Path, edits: &[Edit], out: &Path) -> Result<(), TestCaseError> {
    let loaded = io::load_safetensors(base).map_err(fail)?;
    let (mut tensors, mut meta): (BTreeMap<String, Array>, BTreeMap<String, String>) =
        (loaded.tensors, loaded.metadata);
    for e in edits {
        match e {
            Edit::Json(k, edits) => {
                if let Some(text) = meta.get_mut(META_KEYS[*k]) {
                    let mut v: Value = serde_json::from_str(text).unwrap_or(Value::String(text.clone()));
                    for je in edits {
                        fuzz::apply_edit(&mut v, je);
                    }
                    *text = serde_json::to_string(&v).map_err(fail)?;
                }
            }
            Edit::Text(k, s) => {
                meta.insert(META_KEYS[*k].to_owned(), s.replace('\0', ""));
            }
            Edit::DropMeta(k) => {
                meta.remove(META_KEYS[*k]);
            }
            Edit::Tensor(t) => t.apply(&mut tensors)?,
        }
    }
    io::save_safetensors(out, tensors.iter().map(|(k, a)| (k.as_str(), a)), &meta).map_err(fail)
}

#[test]
fn saved_files_load_and_continue() {
    let setup = Setup::new();
    for base in &setup.bases {
        check_file(&setup, base).unwrap();
    }
    let session = SessionCache::load(&setup.bases[0], setup.model(), &setup.fingerprint).unwrap();
    assert_eq!(session.tokens().len(), 20);
}

#[test]
fn mutated_session_files_are_refused_or_usable() {
    let setup = Setup::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("case.safetensors");
    let case = (0..setup.bases.len(), prop::collection::vec(edit(), 1..4));
    fuzz::check(CASES, &case, |(base, edits)| {
        write_edited(&setup.bases[base], &edits, &out)?;
        check_file(&setup, &out)
    });
}

#[test]
fn session_files_with_edited_bytes_are_refused_or_usable() {
    let setup = Setup::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("case.safetensors");
    let bytes: Vec<Vec<u8>> = setup.bases.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let case = (0..bytes.len(), fuzz::byte_edits(3), any::<bool>());
    fuzz::check(CASES, &case, |(base, edits, header_only)| {
        let b = &bytes[base];
        let header_end = 8 + u64::from_le_bytes(b[..8].try_into().unwrap_or_default()) as usize;
        let range = if header_only { 8..header_end } else { 0..b.len() };
        std::fs::write(&out, fuzz::apply_bytes(b, &edits, range)).map_err(fail)?;
        check_file(&setup, &out)
    });
}
