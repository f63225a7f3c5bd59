// SPDX-License-Identifier: EUPL-1.2
//! Helpers shared by the mlx-train tests: fixture models, the real models and
//! the mlx-lm interpreter (skipped with a note unless `MLXR_REQUIRE_REAL_MODELS=1`),
//! data files and trainers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use mlx_metal::model::LoadedModel;
use mlx_train::{DataConfig, Dataset, Encoder, StepSettings, Trainer};

/// A tiny fixture model under `testdata/models`.
pub(crate) fn tiny(name: &str) -> PathBuf {
    parity::testdata_dir().join("models").join(name)
}

fn skip_or_fail(what: &str) {
    if parity::real_models_required() {
        panic!("{what} (MLXR_REQUIRE_REAL_MODELS=1 makes this an error; run `cargo xtask fixtures`)");
    }
    eprintln!("note: skipping: {what} (set MLXR_REQUIRE_REAL_MODELS=1 to make this an error)");
}

/// A real model from the models cache, or `None` (with a note) when it is absent.
pub(crate) fn real(name: &str) -> Option<PathBuf> {
    let Some(dir) = parity::models_dir().map(|d| d.join(name)) else {
        skip_or_fail("no models cache directory");
        return None;
    };
    if dir.join("config.json").is_file() {
        Some(dir)
    } else {
        skip_or_fail(&format!("the real model {} is not there", dir.display()));
        None
    }
}

/// The mlx-lm interpreter from `MLXR_PYTHON`, or `None` (with a note).
pub(crate) fn python() -> Option<PathBuf> {
    match std::env::var_os("MLXR_PYTHON").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            skip_or_fail("MLXR_PYTHON is not set, so mlx-lm cannot give reference numbers");
            None
        }
    }
}

/// Runs `mlxlm_reference.py` with `args` and parses its JSON output.
///
/// mlx-lm runs on the BLAS this process runs on: the optimised one our build links, preloaded
/// into Python (whose `mlx` otherwise calls the reference BLAS its wheel carries). Training
/// rounds float32 matmuls' results to bfloat16, so a different summation order moves the loss and
/// the gradients by more than the tolerance: only the same BLAS gives the same numbers.
pub(crate) fn reference(python: &Path, args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mlxlm_reference.py");
    let mut command = Command::new(python);
    let blas = mlx::blas::info();
    if let Some(lib) = blas.library.as_ref().filter(|_| !blas.is_reference()) {
        command.env("LD_PRELOAD", lib);
    }
    let out = command.arg(&script).args(args).output().expect("running the mlx-lm reference script");
    assert!(
        out.status.success(),
        "mlxlm_reference.py {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad reference output ({e}): {stdout}"))
}

/// Writes `lines` as `dir/name`.
pub(crate) fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").expect("writing a data file");
    path
}

/// Short prompt/completion records to memorise.
pub(crate) fn completions(n: usize) -> Vec<String> {
    let facts = [
        ("What colour is the sky?", "The sky is blue."),
        ("What is two plus two?", "Two plus two is four."),
        ("Name a large cat.", "A tiger is a large cat."),
        ("What do bees make?", "Bees make honey."),
        ("Where do fish live?", "Fish live in water."),
        ("What is frozen water?", "Frozen water is ice."),
        ("How many legs has a spider?", "A spider has eight legs."),
        ("What do cows drink?", "Cows drink water."),
    ];
    (0..n)
        .map(|i| {
            let (p, c) = facts[i % facts.len()];
            serde_json::json!({"prompt": p, "completion": c}).to_string()
        })
        .collect()
}

/// The same facts as `{"text": ...}` records (for models without a chat template).
pub(crate) fn texts(n: usize) -> Vec<String> {
    completions(n)
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a record");
            let text = format!("{} {}", v["prompt"].as_str().unwrap_or(""), v["completion"].as_str().unwrap_or(""));
            serde_json::json!({ "text": text }).to_string()
        })
        .collect()
}

/// Loads `lines` as a dataset for `model`.
pub(crate) fn dataset(model: &LoadedModel, lines: &[String], cfg: &DataConfig) -> Dataset {
    let (tok, template) = mlx_train::load_encoding(&model.dir, &model.config.model_type).expect("tokeniser");
    let enc = Encoder { tokenizer: &tok, template: &template };
    Dataset::parse(Path::new("train.jsonl"), &(lines.join("\n") + "\n"), &enc, cfg).expect("dataset")
}

/// A trainer with a fresh adapter on `q_proj` and `v_proj` of every block.
pub(crate) fn trainer(model: LoadedModel, settings: StepSettings, dtype: mlx::Dtype, seed: u64) -> Trainer {
    let n = model.model.num_layers();
    trainer_top(model, settings, dtype, seed, n)
}

/// A trainer with a fresh adapter on `q_proj` and `v_proj` of the top `layers` blocks (the backward pass
/// stops at the lowest adapted block, so fewer layers train faster).
pub(crate) fn trainer_top(
    model: LoadedModel,
    settings: StepSettings,
    dtype: mlx::Dtype,
    seed: u64,
    layers: usize,
) -> Trainer {
    mlx::random::seed(seed).unwrap();
    let n = model.model.num_layers();
    let lora = inference_core::LoraConfig::default().rank(4).num_layers(layers);
    let cfg = mlx_train::adapter_config(&lora, n);
    Trainer::new(model.model, cfg, dtype, settings).expect("a trainer")
}
