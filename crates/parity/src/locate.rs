// SPDX-License-Identifier: EUPL-1.2
//! Where the fixtures are, and loading a golden together with the model it belongs to.
//!
//! - `testdata/` (committed): found from this crate's manifest directory, or `MLXR_TESTDATA_DIR`.
//! - the models cache (real models, made by `cargo xtask fixtures`): `MLXR_MODELS_DIR`, else
//!   `MLXR_CACHE_DIR/models`, else `$XDG_CACHE_HOME/mlxr/models`, else `~/.cache/mlxr/models`.
//!   Goldens record these paths as `$MLXR_MODELS/<name>`.
//!
//! Real models are not committed. A test that needs one calls [`real_fixture`]: when the models
//! are missing it returns `Ok(None)` after printing a note, unless `MLXR_REQUIRE_REAL_MODELS=1`
//! (set by CI after it has run the fixtures step), in which case it is an error.

use std::collections::BTreeMap;
use std::env;
use std::path::{Path, PathBuf};

use crate::FixtureError;
use crate::golden::{Kind, ModelGolden, TokenizerGolden};

/// The placeholder that goldens use for the models cache.
pub const MODELS_PLACEHOLDER: &str = "$MLXR_MODELS/";
/// Set to `1` to turn a missing real model into an error instead of a skipped test.
pub const REQUIRE_REAL_MODELS_ENV: &str = "MLXR_REQUIRE_REAL_MODELS";
/// The stamp `convert_gguf.py` writes into every finished real model directory.
pub const REAL_MODEL_STAMP: &str = ".mlxr-stamp.json";

fn var(name: &str) -> Option<PathBuf> {
    env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().and_then(Path::parent).unwrap_or(manifest).to_path_buf()
}

/// `testdata/` at the workspace root, or `MLXR_TESTDATA_DIR`.
pub fn testdata_dir() -> PathBuf {
    var("MLXR_TESTDATA_DIR").unwrap_or_else(|| workspace_root().join("testdata"))
}

/// `testdata/golden/`.
pub fn golden_dir() -> PathBuf {
    testdata_dir().join("golden")
}

/// The models cache that `cargo xtask fixtures` fills (see the module docs for the order).
pub fn models_dir() -> Option<PathBuf> {
    models_dir_from(var)
}

pub(crate) fn models_dir_from(var: impl Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    if let Some(p) = var("MLXR_MODELS_DIR") {
        return Some(p);
    }
    if let Some(p) = var("MLXR_CACHE_DIR") {
        return Some(p.join("models"));
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Some(p.join("mlxr").join("models"));
    }
    var("HOME").map(|h| h.join(".cache").join("mlxr").join("models"))
}

/// Whether `MLXR_REQUIRE_REAL_MODELS` is set to something other than empty or `0`.
pub fn real_models_required() -> bool {
    env::var(REQUIRE_REAL_MODELS_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Turns a path recorded in a golden into a path on this machine.
///
/// # Errors
/// The path is under the models cache and no cache directory can be found.
pub fn resolve_recorded(recorded: &str) -> Result<PathBuf, FixtureError> {
    match recorded.strip_prefix(MODELS_PLACEHOLDER) {
        Some(rest) => Ok(models_dir().ok_or(FixtureError::NoModelsDir)?.join(rest)),
        None => Ok(workspace_root().join(recorded)),
    }
}

/// The path of the golden for a model or tokenizer name.
pub fn golden_path(name: &str) -> PathBuf {
    golden_dir().join(format!("{name}.json"))
}

/// Every golden file, sorted by name.
///
/// # Errors
/// `testdata/golden` cannot be listed.
pub fn golden_files() -> Result<Vec<PathBuf>, FixtureError> {
    let dir = golden_dir();
    let entries = std::fs::read_dir(&dir).map_err(|e| FixtureError::Io { path: dir.clone(), source: e })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// A model golden with the directory of the model it was made from.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The fixture's name (`gemma3-tiny`, `smollm2-135m-instruct-8bit`, ...).
    pub name: String,
    /// The golden outputs.
    pub golden: ModelGolden,
    /// The model directory on this machine (config.json, model.safetensors, tokenizer files).
    pub model_dir: PathBuf,
}

/// A tokenizer golden with the tokenizer.json it was made from.
#[derive(Debug, Clone)]
pub struct TokenizerFixture {
    /// The tokenizer's name (`tiny-spm`, `gemma3-270m`, ...).
    pub name: String,
    /// The golden encodes and decodes.
    pub golden: TokenizerGolden,
    /// The tokenizer.json on this machine.
    pub tokenizer_file: PathBuf,
}

impl Fixture {
    /// Loads `testdata/golden/<name>.json` and checks that its model is present and that the
    /// golden was made from these exact model files (see [`stale_files`]).
    ///
    /// # Errors
    /// [`FixtureError::Missing`] when the golden or the model is absent,
    /// [`FixtureError::Stale`] when the model files changed since the golden was made, and
    /// parse errors.
    pub fn load(name: &str) -> Result<Self, FixtureError> {
        let path = golden_path(name);
        if !path.is_file() {
            return Err(FixtureError::Missing { what: format!("the golden {}", path.display()) });
        }
        let golden = ModelGolden::load(&path)?;
        let model_dir = resolve_recorded(&golden.model_dir)?;
        if !model_dir.join("config.json").is_file() {
            return Err(FixtureError::Missing { what: format!("the model {}", model_dir.display()) });
        }
        let stale = stale_files(golden.kind, &model_dir, &golden.files_sha256)?;
        if !stale.is_empty() {
            return Err(FixtureError::Stale { golden: path, files: stale });
        }
        Ok(Fixture { name: name.to_string(), golden, model_dir })
    }

    /// The model's tokenizer.json.
    pub fn tokenizer_file(&self) -> PathBuf {
        self.model_dir.join("tokenizer.json")
    }
}

impl TokenizerFixture {
    /// Loads `testdata/golden/tokenizer-<name>.json` and checks that its tokenizer.json is
    /// present and unchanged.
    ///
    /// # Errors
    /// As [`Fixture::load`].
    pub fn load(name: &str) -> Result<Self, FixtureError> {
        let path = golden_path(&format!("tokenizer-{name}"));
        if !path.is_file() {
            return Err(FixtureError::Missing { what: format!("the golden {}", path.display()) });
        }
        let golden = TokenizerGolden::load(&path)?;
        let tokenizer_file = resolve_recorded(&golden.tokenizer_file)?;
        if !tokenizer_file.is_file() {
            return Err(FixtureError::Missing { what: format!("the tokenizer {}", tokenizer_file.display()) });
        }
        if let (Some(want), Some(dir)) = (&golden.tokenizer_sha256, tokenizer_file.parent()) {
            let expected = BTreeMap::from([("tokenizer.json".to_string(), want.clone())]);
            let stale = stale_files(golden.kind, dir, &expected)?;
            if !stale.is_empty() {
                return Err(FixtureError::Stale { golden: path, files: stale });
            }
        }
        Ok(TokenizerFixture { name: name.to_string(), golden, tokenizer_file })
    }
}

/// The model files whose sha256 differs from what a golden recorded, by the record that
/// `cargo xtask fixtures` keeps of them (no hashing here): `testdata/models/MANIFEST.json` for
/// tiny models, the `.mlxr-stamp.json` in the model directory for real ones.
///
/// # Errors
/// The record cannot be read.
pub fn stale_files(
    kind: Kind,
    model_dir: &Path,
    expected: &BTreeMap<String, String>,
) -> Result<Vec<String>, FixtureError> {
    let (record_path, prefix) = match kind {
        Kind::Tiny => {
            let name = model_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            (model_dir.parent().unwrap_or(model_dir).join("MANIFEST.json"), format!("{name}/"))
        }
        Kind::Real => (model_dir.join(REAL_MODEL_STAMP), String::new()),
    };
    let text =
        std::fs::read_to_string(&record_path).map_err(|e| FixtureError::Io { path: record_path.clone(), source: e })?;
    let record: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| FixtureError::Parse { path: record_path.clone(), message: e.to_string() })?;
    let sums = record.get("sha256").and_then(|s| s.as_object());
    Ok(expected
        .iter()
        .filter(|(file, digest)| {
            let have = sums.and_then(|s| s.get(&format!("{prefix}{file}"))).and_then(|v| v.as_str());
            have != Some(digest.as_str())
        })
        .map(|(file, _)| file.clone())
        .collect())
}

/// The names of all tiny model fixtures (those with a `kind: tiny` model golden).
///
/// # Errors
/// `testdata/golden` cannot be read or a golden does not parse.
pub fn tiny_fixture_names() -> Result<Vec<String>, FixtureError> {
    names_of(Kind::Tiny, false)
}

/// The names of all real model fixtures that have a golden (whether or not the models are here).
///
/// # Errors
/// As [`tiny_fixture_names`].
pub fn real_fixture_names() -> Result<Vec<String>, FixtureError> {
    names_of(Kind::Real, false)
}

/// The names of the tokenizer goldens of one kind (without the `tokenizer-` prefix).
///
/// # Errors
/// As [`tiny_fixture_names`].
pub fn tokenizer_names(kind: Kind) -> Result<Vec<String>, FixtureError> {
    names_of(kind, true)
}

fn names_of(kind: Kind, tokenizers: bool) -> Result<Vec<String>, FixtureError> {
    let mut names = Vec::new();
    for path in golden_files()? {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        match crate::golden::Golden::load(&path)? {
            crate::golden::Golden::Model(g) if !tokenizers && g.kind == kind => names.push(stem),
            crate::golden::Golden::Tokenizer(g) if tokenizers && g.kind == kind => {
                names.push(stem.trim_start_matches("tokenizer-").to_string())
            }
            _ => {}
        }
    }
    Ok(names)
}

/// Loads a fixture that needs a real model. When the model (or its golden) is missing, prints a
/// note and returns `Ok(None)` so the test can return early, unless `MLXR_REQUIRE_REAL_MODELS=1`.
///
/// # Errors
/// The fixture is missing and real models are required, or it is stale or does not parse.
pub fn real_fixture(name: &str) -> Result<Option<Fixture>, FixtureError> {
    skip_if_missing(Fixture::load(name), name)
}

/// [`real_fixture`] for a tokenizer golden.
///
/// # Errors
/// As [`real_fixture`].
pub fn real_tokenizer_fixture(name: &str) -> Result<Option<TokenizerFixture>, FixtureError> {
    skip_if_missing(TokenizerFixture::load(name), name)
}

fn skip_if_missing<T>(loaded: Result<T, FixtureError>, name: &str) -> Result<Option<T>, FixtureError> {
    skip_unless_required(loaded, name, real_models_required())
}

fn skip_unless_required<T>(
    loaded: Result<T, FixtureError>,
    name: &str,
    required: bool,
) -> Result<Option<T>, FixtureError> {
    match loaded {
        Ok(f) => Ok(Some(f)),
        Err(e @ (FixtureError::Missing { .. } | FixtureError::NoModelsDir)) if !required => {
            eprintln!(
                "note: skipping the `{name}` parity check: {e} (set {REQUIRE_REAL_MODELS_ENV}=1 to make this an error)"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<PathBuf> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| PathBuf::from(v))
    }

    #[test]
    fn models_dir_follows_the_documented_order() {
        static ALL: [(&str, &str); 4] =
            [("MLXR_MODELS_DIR", "/m"), ("MLXR_CACHE_DIR", "/c"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(models_dir_from(env(&ALL[..])), Some(PathBuf::from("/m")));
        assert_eq!(models_dir_from(env(&ALL[1..])), Some(PathBuf::from("/c/models")));
        assert_eq!(models_dir_from(env(&ALL[2..])), Some(PathBuf::from("/x/mlxr/models")));
        assert_eq!(models_dir_from(env(&ALL[3..])), Some(PathBuf::from("/h/.cache/mlxr/models")));
        assert_eq!(models_dir_from(env(&[])), None);
    }

    #[test]
    fn missing_real_models_skip_unless_required() {
        let missing = || Err::<(), _>(FixtureError::Missing { what: "the model /nowhere".into() });
        assert!(skip_unless_required(missing(), "x", false).unwrap().is_none());
        let err = skip_unless_required(missing(), "x", true).unwrap_err();
        assert!(err.to_string().contains("run `cargo xtask fixtures`"), "{err}");
        assert!(skip_unless_required(Err::<(), _>(FixtureError::NoModelsDir), "x", false).unwrap().is_none());
        // Other failures are never skipped: a stale golden is a real problem.
        let stale =
            Err::<(), _>(FixtureError::Stale { golden: "g.json".into(), files: vec!["model.safetensors".into()] });
        assert!(skip_unless_required(stale, "x", false).is_err());
        assert_eq!(skip_unless_required(Ok(7), "x", true).unwrap(), Some(7));
    }

    #[test]
    fn recorded_paths_resolve() {
        let tiny = resolve_recorded("testdata/models/gemma3-tiny").unwrap();
        assert!(tiny.ends_with("testdata/models/gemma3-tiny"));
        if let Some(m) = models_dir() {
            assert_eq!(
                resolve_recorded("$MLXR_MODELS/smollm2-135m-instruct").unwrap(),
                m.join("smollm2-135m-instruct")
            );
        }
    }
}
