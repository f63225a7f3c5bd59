// SPDX-License-Identifier: EUPL-1.2
//! Adapter directories (`mlx_metal::lora`): adapters saved for llama-tiny and qwen3-tiny-4bit
//! (every layer, and two keys on the top block), their `adapter_config.json` mutated, their
//! `adapters.safetensors` tensors changed and bytes edited, then loaded onto the model. An
//! adapter that loads must run; one that is refused leaves the model without an adapter, and
//! `read_adapter` (the served adapters' reader) agrees with `load_adapter` on which load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mlx::{Array, Dtype, io, random};
use mlx_metal::lora::{self, AdapterConfig, LoraParameters};
use mlx_metal::model::{self, LanguageModel};
use parity::fuzz;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use crate::common::tiny_model;
use crate::{TensorEdit, expect_message, fail, run_step, tensor_edit};

const CASES: u32 = 128;

/// Names and values of adapter_config.json.
const WORDS: &[&str] = &[
    "fine_tune_type",
    "lora",
    "dora",
    "full",
    "num_layers",
    "lora_parameters",
    "rank",
    "scale",
    "dropout",
    "keys",
    "self_attn.q_proj",
    "self_attn.v_proj",
    "mlp.down_proj",
    "q_proj",
    "o_proj",
    "embed_tokens",
    "lm_head",
    "model.layers.0.self_attn.q_proj",
];

/// The models adapters are loaded onto: dense and quantised.
const MODELS: &[&str] = &["llama-tiny", "qwen3-tiny-4bit"];

/// A model with its saved adapters (directories holding both files).
struct Setup {
    models: Vec<Box<dyn LanguageModel>>,
    /// `(model index, adapter directory)`.
    bases: Vec<(usize, PathBuf)>,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut models = Vec::new();
        let mut bases = Vec::new();
        for (m, name) in MODELS.iter().enumerate() {
            let mut model = model::load(&tiny_model(name)).unwrap().model;
            for (a, (keys, num_layers)) in
                [(None, 0), (Some(vec!["self_attn.q_proj", "v_proj"]), 1)].into_iter().enumerate()
            {
                random::seed(7).unwrap();
                let keys = keys.map(|k: Vec<&str>| k.into_iter().map(str::to_owned).collect());
                let mut config =
                    AdapterConfig::new(num_layers, LoraParameters { rank: 2, scale: 2.0, dropout: 0.0, keys });
                lora::apply_lora(model.as_mut(), &mut config, Dtype::Float32).unwrap();
                let out = dir.path().join(format!("{name}-{a}"));
                lora::save_adapter(model.as_mut(), &out, &config).unwrap();
                lora::remove_lora(model.as_mut());
                bases.push((m, out));
            }
            models.push(model);
        }
        Setup { models, bases, _dir: dir }
    }
}

/// Loads the adapter in `dir` onto `model` both ways and checks the outcome.
fn check_adapter(model: &mut dyn LanguageModel, dir: &Path) -> Result<(), TestCaseError> {
    let read = lora::read_adapter(model, dir);
    let loaded = lora::load_adapter(model, dir);
    prop_assert_eq!(
        read.is_ok(),
        loaded.is_ok(),
        "read_adapter and load_adapter disagree: {:?}",
        loaded.as_ref().err()
    );
    match loaded {
        Ok(config) => {
            prop_assert!(lora::lora_parameter_count(model) > 0, "an adapter loaded with no weights");
            prop_assert!(config.lora_parameters.rank >= 1);
            let out = run_step(model, None);
            lora::remove_lora(model);
            out
        }
        Err(e) => {
            expect_message(&e)?;
            prop_assert_eq!(lora::lora_parameter_count(model), 0, "a refused adapter left weights attached: {}", e);
            Ok(())
        }
    }
}

/// One change to an adapter directory.
#[derive(Debug, Clone)]
enum Edit {
    /// adapter_config.json mutated.
    Config(Value),
    /// adapter_config.json replaced with any text.
    ConfigText(String),
    /// A tensor of adapters.safetensors changed.
    Tensor(TensorEdit),
    /// adapters.safetensors's bytes edited (within its header when `bool`).
    Bytes(Vec<fuzz::ByteEdit>, bool),
}

fn edits(config: Value) -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        4 => fuzz::mutated_json(config, WORDS, 3).prop_map(Edit::Config),
        1 => fuzz::json_string(WORDS).prop_map(Edit::ConfigText),
        4 => tensor_edit("model\\.layers\\.[0-9]\\.(self_attn|mlp)\\.[a-z_]{1,9}\\.lora_[ab]").prop_map(Edit::Tensor),
        2 => (fuzz::byte_edits(3), any::<bool>()).prop_map(|(e, h)| Edit::Bytes(e, h)),
    ];
    prop::collection::vec(edit, 1..4)
}

/// A copy of the adapter in `base` at `out` with `edits` applied.
fn write_edited(base: &Path, edits: &[Edit], out: &Path) -> Result<(), TestCaseError> {
    std::fs::create_dir_all(out).map_err(fail)?;
    let mut config = std::fs::read_to_string(base.join(lora::ADAPTER_CONFIG)).map_err(fail)?;
    let mut tensors: BTreeMap<String, Array> =
        io::load_safetensors(base.join(lora::ADAPTER_FILE)).map_err(fail)?.tensors;
    let mut byte_edits = Vec::new();
    for e in edits {
        match e {
            Edit::Config(v) => config = serde_json::to_string_pretty(v).map_err(fail)?,
            Edit::ConfigText(t) => config = t.clone(),
            Edit::Tensor(t) => t.apply(&mut tensors)?,
            Edit::Bytes(b, header) => byte_edits.push((b, *header)),
        }
    }
    std::fs::write(out.join(lora::ADAPTER_CONFIG), config).map_err(fail)?;
    let file = out.join(lora::ADAPTER_FILE);
    io::save_safetensors(&file, tensors.iter().map(|(k, a)| (k.as_str(), a)), &BTreeMap::new()).map_err(fail)?;
    for (edits, header_only) in byte_edits {
        let bytes = std::fs::read(&file).map_err(fail)?;
        let header_end =
            8 + bytes.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default())) as usize;
        let range = if header_only { 8..header_end } else { 0..bytes.len() };
        std::fs::write(&file, fuzz::apply_bytes(&bytes, edits, range)).map_err(fail)?;
    }
    Ok(())
}

#[test]
fn saved_adapters_load_and_run() {
    let mut setup = Setup::new();
    for (m, dir) in setup.bases.clone() {
        let model = setup.models[m].as_mut();
        check_adapter(model, &dir).unwrap();
        lora::load_adapter(model, &dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        lora::remove_lora(model);
    }
}

#[test]
fn mutated_adapter_directories_are_refused_or_run() {
    let setup = std::cell::RefCell::new(Setup::new());
    let scratch = tempfile::tempdir().unwrap();
    let bases: Vec<(usize, PathBuf, Value)> = setup
        .borrow()
        .bases
        .iter()
        .map(|(m, dir)| {
            let text = std::fs::read_to_string(dir.join(lora::ADAPTER_CONFIG)).unwrap();
            (*m, dir.clone(), serde_json::from_str(&text).unwrap())
        })
        .collect();
    let case = (0..bases.len()).prop_flat_map(move |i| (Just(i), edits(bases[i].2.clone())));
    let dirs: Vec<(usize, PathBuf)> = setup.borrow().bases.clone();
    fuzz::check(CASES, &case, |(i, edits)| {
        let (m, base) = &dirs[i];
        let out = scratch.path().join("case");
        let _ = std::fs::remove_dir_all(&out);
        write_edited(base, &edits, &out)?;
        let mut setup = setup.borrow_mut();
        check_adapter(setup.models[*m].as_mut(), &out)
    });
}

#[test]
fn adapter_parameters_at_their_edges_are_refused_or_run() {
    // Aimed: one field of adapter_config.json set to an edge value, the weights left as saved.
    let setup = std::cell::RefCell::new(Setup::new());
    let scratch = tempfile::tempdir().unwrap();
    let dirs: Vec<(usize, PathBuf)> = setup.borrow().bases.clone();
    let field = proptest::sample::select(vec![
        "/num_layers",
        "/lora_parameters/rank",
        "/lora_parameters/scale",
        "/lora_parameters/dropout",
        "/lora_parameters/keys",
        "/fine_tune_type",
    ]);
    let value = prop_oneof![
        3 => fuzz::json_number(),
        1 => prop::collection::vec(fuzz::json_string(WORDS).prop_map(Value::String), 0..4).prop_map(Value::Array),
        1 => fuzz::json_value(WORDS),
    ];
    fuzz::check(CASES, &(0..dirs.len(), field, value), |(i, field, value)| {
        let (m, base) = &dirs[i];
        let out = scratch.path().join("case");
        let _ = std::fs::remove_dir_all(&out);
        let text = std::fs::read_to_string(base.join(lora::ADAPTER_CONFIG)).map_err(fail)?;
        let mut config: Value = serde_json::from_str(&text).map_err(fail)?;
        if let Some(slot) = config.pointer_mut(field) {
            *slot = value;
        }
        let edit = Edit::Config(config);
        write_edited(base, std::slice::from_ref(&edit), &out)?;
        let mut setup = setup.borrow_mut();
        check_adapter(setup.models[*m].as_mut(), &out)
    });
}
