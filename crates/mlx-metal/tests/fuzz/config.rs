// SPDX-License-Identifier: EUPL-1.2
//! `config.json`: arbitrary JSON through the parser and every architecture's typed config, and
//! each tiny fixture's own config mutated and loaded with its weights.

use std::path::{Path, PathBuf};

use mlx_metal::model::config::ModelConfig;
use mlx_metal::model::{self, gemma3, llama, qwen2, qwen3};
use parity::fuzz;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use crate::common::tiny_model;
use crate::{expect_message, fail, run_step};

/// Cases per property: parsing alone is cheap, a load reads a model.
const PARSE_CASES: u32 = 256;
const LOAD_CASES: u32 = 96;

/// The fixtures whose configs are mutated: every architecture, dense and quantised.
const FIXTURES: &[&str] = &["llama-tiny", "llama3-tiny", "qwen2-tiny", "qwen3-tiny", "gemma3-tiny", "qwen3-tiny-4bit"];

/// The numeric fields the readers turn into sizes.
const NUMERIC: &[&str] = &[
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
    "sliding_window",
    "sliding_window_pattern",
    "rope_theta",
    "rope_local_base_freq",
    "query_pre_attn_scalar",
];

/// Field names and values of config.json (all architectures).
const WORDS: &[&str] = &[
    "model_type",
    "architectures",
    "text_config",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "rope_theta",
    "rope_traditional",
    "rope_scaling",
    "rope_parameters",
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "tie_word_embeddings",
    "layer_types",
    "sliding_window",
    "sliding_window_pattern",
    "rope_local_base_freq",
    "query_pre_attn_scalar",
    "quantization",
    "quantization_config",
    "group_size",
    "bits",
    "mode",
    "quant_method",
    "sliding_attention",
    "full_attention",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3",
    "gemma3_text",
    "LlamaForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Qwen3ForCausalLM",
    "default",
    "linear",
    "llama3",
    "dynamic",
    "affine",
    "mxfp4",
    "mlx",
    "awq",
    "model.layers.0.mlp.down_proj",
];

/// Parses `value` as config.json and reads it as every architecture's config: each must give a
/// value or an error, never panic.
fn parse_all(path: &Path, value: &Value) -> Result<(), TestCaseError> {
    let text = serde_json::to_string(value).map_err(fail)?;
    let config = match ModelConfig::parse(path, &text) {
        Ok(c) => c,
        Err(e) => return expect_message(&e),
    };
    let results = [
        config.text_as::<llama::Config>(path).err(),
        config.text_as::<qwen2::Config>(path).err(),
        config.text_as::<qwen3::Config>(path).err(),
        config.text_with_defaults::<gemma3::Config>(path, gemma3::defaults()).err(),
    ];
    for e in results.iter().flatten() {
        expect_message(e)?;
    }
    if let Some(q) = &config.quant {
        let _ = q.layer_override("model.layers.0.mlp.down_proj");
    }
    Ok(())
}

/// A fixture's own config.json.
fn fixture_config(name: &str) -> Value {
    let text = std::fs::read_to_string(tiny_model(name).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A scratch directory per fixture holding its files, whose config.json each case rewrites.
struct Scratch {
    dirs: Vec<(tempfile::TempDir, Value)>,
    /// llama-tiny-8bit, for the quantisation entries.
    extra: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dirs = FIXTURES.iter().map(|name| (crate::common::copy_tiny_model(name), fixture_config(name))).collect();
        Scratch { dirs, extra: crate::common::copy_tiny_model("llama-tiny-8bit") }
    }

    fn base(&self, i: usize) -> (PathBuf, Value) {
        let (dir, config) = &self.dirs[i % self.dirs.len()];
        (dir.path().to_path_buf(), config.clone())
    }
}

/// Writes `config` into `dir` and loads the model: it loads and runs a step, or is refused with
/// an error naming the directory.
pub(crate) fn load_with_config(dir: &Path, config: &Value) -> Result<(), TestCaseError> {
    let text = serde_json::to_string_pretty(config).map_err(fail)?;
    std::fs::write(dir.join("config.json"), text).map_err(fail)?;
    match model::load(dir) {
        Ok(loaded) => run_step(loaded.model.as_ref(), None),
        Err(e) => {
            expect_message(&e)?;
            prop_assert!(
                e.to_string().contains(&dir.display().to_string()),
                "the error does not name the model directory: {e}"
            );
            Ok(())
        }
    }
}

#[test]
fn fixture_configs_as_they_are_load_and_run() {
    let scratch = Scratch::new();
    for (i, name) in FIXTURES.iter().enumerate() {
        let (dir, config) = scratch.base(i);
        load_with_config(&dir, &config).unwrap();
        assert!(model::load(&dir).is_ok(), "{name}");
    }
}

#[test]
fn arbitrary_config_json_parses_or_is_refused() {
    let path = Path::new("/fuzz/config.json");
    let value = prop_oneof![fuzz::json_object(WORDS), fuzz::json_value(WORDS)];
    fuzz::check(PARSE_CASES, &value, |v| parse_all(path, &v));
}

#[test]
fn mutated_fixture_configs_parse_or_are_refused() {
    let path = Path::new("/fuzz/config.json");
    let bases: Vec<Value> = FIXTURES.iter().map(|name| fixture_config(name)).collect();
    let case = (0..bases.len()).prop_flat_map(move |i| fuzz::mutated_json(bases[i].clone(), WORDS, 4));
    fuzz::check(PARSE_CASES, &case, |v| parse_all(path, &v));
}

#[test]
fn mutated_fixture_configs_load_or_are_refused() {
    let scratch = Scratch::new();
    let bases: Vec<(PathBuf, Value)> = (0..FIXTURES.len()).map(|i| scratch.base(i)).collect();
    let case = (0..bases.len()).prop_flat_map(move |i| {
        let (dir, config) = bases[i].clone();
        (Just(dir), fuzz::mutated_json(config, WORDS, 2))
    });
    fuzz::check(LOAD_CASES, &case, |(dir, config)| load_with_config(&dir, &config));
}

#[test]
fn size_fields_at_their_edges_load_or_are_refused() {
    // Aimed: one size of each fixture's config set to an edge value (zero, negative, huge, a
    // fraction, a string), where nested configs put it too.
    let scratch = Scratch::new();
    let bases: Vec<(PathBuf, Value)> = (0..FIXTURES.len()).map(|i| scratch.base(i)).collect();
    let value = prop_oneof![4 => fuzz::json_number(), 1 => fuzz::json_value(WORDS)];
    let case = (0..bases.len(), proptest::sample::select(NUMERIC), value);
    fuzz::check(LOAD_CASES, &case, |(i, field, value)| {
        let (dir, mut config) = bases[i].clone();
        config[field] = value.clone();
        if let Some(tc) = config.get_mut("text_config").and_then(Value::as_object_mut) {
            tc.insert(field.to_owned(), value);
        }
        load_with_config(&dir, &config)
    });
}

#[test]
fn quantisation_entries_at_their_edges_load_or_are_refused() {
    // Aimed: the quantised fixtures' `quantization` entry rewritten, with a per-layer entry.
    let scratch = Scratch::new();
    let quantised: Vec<(PathBuf, Value)> = (0..FIXTURES.len())
        .map(|i| scratch.base(i))
        .filter(|(_, c)| c.get("quantization").is_some())
        .chain(std::iter::once((scratch.extra.path().to_path_buf(), fixture_config("llama-tiny-8bit"))))
        .collect();
    let number = prop_oneof![3 => proptest::sample::select(vec![2, 3, 4, 5, 6, 8, 32, 64, 128]).prop_map(Value::from), 2 => fuzz::json_number()];
    let layer = proptest::sample::select(vec![
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.embed_tokens",
        "lm_head",
    ]);
    let entry = (number.clone(), number.clone(), layer, number.clone(), number, fuzz::json_string(WORDS));
    fuzz::check(LOAD_CASES, &(0..quantised.len(), entry), |(i, (g, b, layer, lg, lb, mode))| {
        let (dir, mut config) = quantised[i].clone();
        config["quantization"] = serde_json::json!({"group_size": g, "bits": b, layer: {"group_size": lg, "bits": lb}});
        if mode != "affine" && !mode.is_empty() {
            config["quantization"]["mode"] = mode.into();
        }
        load_with_config(&dir, &config)
    });
}

#[test]
fn llama_layer_types_still_choose_the_sliding_layers() {
    // The loader no longer reserves a list from the layer count (see regressions.rs): the layer
    // types keep their meaning.
    let dir = crate::common::copy_tiny_model("llama-tiny");
    let mut config = fixture_config("llama-tiny");
    config["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]);
    config["sliding_window"] = 4.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let loaded = model::load(dir.path()).unwrap();
    let caches = loaded.model.make_cache().unwrap();
    let kinds: Vec<bool> = caches.iter().map(|c| matches!(c, mlx_metal::cache::LayerCache::Rotating(_))).collect();
    assert_eq!(kinds, [true, false]);
    for (edit, message) in [
        (
            serde_json::json!({"layer_types": ["full_attention"]}),
            "layer_types lists 1 layers but num_hidden_layers is 2",
        ),
        (serde_json::json!({"sliding_window": 0}), "sliding layers need a positive sliding_window"),
    ] {
        let mut c = config.clone();
        for (k, v) in edit.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let Err(e) = model::load(dir.path()) else { panic!("{edit} loaded") };
        assert!(e.to_string().contains(message), "{e}");
    }
}
