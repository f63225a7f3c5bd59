// SPDX-License-Identifier: EUPL-1.2
//! Switching between backends by name at run time, and the cross-backend check: every registered,
//! available backend must produce the same greedy tokens on the same model.
//!
//! Needs `MLXR_PYTHON` and model directories like tests/real.rs (same skip rules).

use std::path::{Path, PathBuf};

use inference_core::{CancelToken, ComputeDtype, Error, GenerateSettings, LoadSettings};

const PROMPT: &str = "The capital of France is";
const N: usize = 8;

/// Registers every backend this test can use.
fn register_backends() {
    mlxlm_bridge::register();
    mlx_metal::register();
}

/// The tiny models (testdata/models) and the real ones (the models cache), or `MLXR_TEST_MODELS`
/// alone; see tests/real.rs.
fn models() -> Option<Vec<PathBuf>> {
    let require = parity::real_models_required();
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let roots = match var("MLXR_TEST_MODELS") {
        Some(dir) => vec![dir],
        None => vec![
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models"),
            parity::models_dir().unwrap_or_default(),
        ],
    };
    let why = if var("MLXR_PYTHON").is_none() {
        "MLXR_PYTHON is not set".to_owned()
    } else {
        let mut models: Vec<PathBuf> = roots
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flat_map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())))
            .filter(|p| p.join("config.json").is_file())
            .filter(|p| {
                // As in tests/real.rs: real quantised models only with MLXR_BRIDGE_ALL_MODELS=1.
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let real = !p.starts_with(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata"));
                !(real && (n.ends_with("-4bit") || n.ends_with("-8bit")))
                    || var("MLXR_BRIDGE_ALL_MODELS").is_some_and(|v| v == *"1")
            })
            .collect();
        models.sort();
        if !models.is_empty() {
            return Some(models);
        }
        "no model directories found".to_owned()
    };
    assert!(!require, "{} is set but {why}", parity::REQUIRE_REAL_MODELS_ENV);
    eprintln!("note: skipped: {why} (set MLXR_REQUIRE_REAL_MODELS=1 to make this an error)");
    None
}

#[test]
fn an_unknown_backend_name_lists_the_registered_ones() {
    register_backends();
    let Err(err) = inference_core::load_model("/m", &LoadSettings::new().backend("no_such_backend")) else {
        panic!("an unknown backend loaded a model");
    };
    assert!(
        matches!(err, Error::BackendNotRegistered { ref registered, .. } if registered.iter().any(|n| n == "mlx_lm"))
    );
}

#[test]
fn backends_switched_by_name_agree_on_greedy_tokens() {
    register_backends();
    let Some(models) = models() else { return };
    let names = inference_core::list();
    for path in &models {
        let mut outputs: Vec<(String, Vec<u32>)> = Vec::new();
        for name in &names {
            let backend = inference_core::get(name).unwrap();
            if !backend.available() {
                eprintln!("note: backend {name} is not available here: {:?}", backend.unavailable_reason());
                continue;
            }
            // The same compute type on both sides (`auto` keeps mlx-lm's own but may cast in
            // metal): float32, which also checks that the bridge passes the type through.
            let mut settings = LoadSettings::new().backend(name.as_str()).dtype(ComputeDtype::Float32);
            if name == "metal" {
                // As mlx-lm's `set_dtype`: quantised layers stay packed (metal's float32 dequantises).
                settings = settings.backend_option("quantised", "keep");
            }
            let model = inference_core::load_model(path, &settings)
                .unwrap_or_else(|e| panic!("{name} on {}: {}", path.display(), e.report()));
            let info = model.info();
            assert_eq!(info.compute_dtype.as_deref(), Some("float32"), "{name} on {}: {info:?}", path.display());
            let settings = GenerateSettings::new().max_tokens(N).ignore_eos(true);
            let done = model.generate(PROMPT, &settings, CancelToken::new()).unwrap().complete().unwrap();
            assert_eq!(done.tokens.len(), N, "{name} on {}", path.display());
            outputs.push((name.clone(), done.tokens.iter().map(|t| t.id).collect()));
            model.close().unwrap();
        }
        assert!(outputs.iter().any(|(name, _)| name == "mlx_lm"), "mlx_lm must be available when MLXR_PYTHON is set");
        let (first, tokens) = &outputs[0];
        for (name, other) in &outputs[1..] {
            assert_eq!(other, tokens, "{name} and {first} disagree on {}", path.display());
        }
    }
}
