// SPDX-License-Identifier: EUPL-1.2
//! LoRA adapters on the tiny fixtures: attaching, saving and reloading gives
//! identical outputs, fusing equals base plus adapter (dense and quantised),
//! mismatched or missing adapters fail with the problem named, a fused model
//! never lands on another model's files, and the
//! backend loads and swaps adapters on its engine thread.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use inference_core::{CancelToken, GenerateSettings, LoadSettings, TextModel};
use mlx::{Array, Dtype, ops, random};
use mlx_metal::MetalModel;
use mlx_metal::lora::{self, AdapterConfig, LoraParameters};
use mlx_metal::model::{self, LanguageModel, LoadedModel};
use mlx_metal::nn::LinearWeight;

fn load(name: &str) -> LoadedModel {
    model::load(&common::tiny_model(name)).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn config(keys: &[&str], num_layers: i64) -> AdapterConfig {
    AdapterConfig::new(
        num_layers,
        LoraParameters {
            rank: 4,
            scale: 2.0,
            dropout: 0.0,
            keys: Some(keys.iter().map(|k| (*k).to_string()).collect()),
        },
    )
}

/// Attaches an adapter whose `B` is random too, so it changes the output.
fn attach(m: &mut dyn LanguageModel, keys: &[&str], seed: u64) -> AdapterConfig {
    random::seed(seed).unwrap();
    let mut cfg = config(keys, 0);
    lora::apply_lora(m, &mut cfg, Dtype::Float32).unwrap();
    let mut w = lora::lora_weights(m);
    for (name, a) in w.iter_mut() {
        if name.ends_with("lora_b") {
            *a = random::normal(&a.shape(), Dtype::Float32, 0.0, 0.5, None).unwrap();
        }
    }
    lora::set_lora_weights(m, &w).unwrap();
    cfg
}

fn logits(m: &dyn LanguageModel) -> Vec<f32> {
    let x = Array::from_slice(&[1i32, 5, 9, 3, 7, 2], &[1, 6]).unwrap();
    let mut caches = m.make_cache().unwrap();
    let y = m.forward(&x, &mut caches).unwrap();
    ops::astype(&y, Dtype::Float32).unwrap().to_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn apply_selects_targets_and_layers_from_the_top() {
    let mut m = load("llama-tiny");
    let total = m.model.num_layers();
    assert!(total >= 2, "the fixture needs two layers");
    let mut cfg = config(&["q_proj", "mlp.down_proj"], 1);
    let paths = lora::apply_lora(m.model.as_mut(), &mut cfg, Dtype::Float32).unwrap();
    let last = total - 1;
    assert_eq!(paths, [format!("model.layers.{last}.self_attn.q_proj"), format!("model.layers.{last}.mlp.down_proj")]);
    // The config now names the layer-relative paths, as mlx-lm writes them.
    assert_eq!(cfg.lora_parameters.keys.as_deref().unwrap(), ["mlp.down_proj", "self_attn.q_proj"]);
    let w = lora::lora_weights(m.model.as_mut());
    let a = &w[&format!("model.layers.{last}.self_attn.q_proj.lora_a")];
    let b = &w[&format!("model.layers.{last}.self_attn.q_proj.lora_b")];
    let (out, inp) = {
        let lin = m.model.linears_mut().into_iter().find(|(p, _)| p.ends_with(&format!("{last}.self_attn.q_proj")));
        lin.unwrap().1.features().unwrap()
    };
    assert_eq!(a.shape(), [inp, 4]);
    assert_eq!(b.shape(), [4, out]);
    // mlx-lm's initialisation: A uniform in ±1/√in, B zero.
    let bound = 1.0 / (inp as f32).sqrt();
    assert!(a.to_vec::<f32>().unwrap().iter().all(|v| v.abs() <= bound));
    assert!(b.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0));
    // A zero B leaves the output as it was.
    let mut base = load("llama-tiny");
    assert_eq!(logits(m.model.as_ref()), logits(base.model.as_mut()));
    // Bad input is an error, not a panic.
    let mut none = config(&["no_such_proj"], 0);
    assert!(lora::apply_lora(m.model.as_mut(), &mut none, Dtype::Float32).is_err());
    assert!(lora::lora_weights(m.model.as_mut()).is_empty(), "a failed apply leaves no adapter");
    // Applying again replaces the whole adapter.
    lora::apply_lora(m.model.as_mut(), &mut config(&["k_proj"], 0), Dtype::Float32).unwrap();
    let names: Vec<String> = lora::lora_weights(m.model.as_mut()).into_keys().collect();
    assert!(names.iter().all(|n| n.contains("k_proj")), "{names:?}");
    let mut bad_rank = config(&["q_proj"], 0);
    bad_rank.lora_parameters.rank = 0;
    assert!(lora::apply_lora(m.model.as_mut(), &mut bad_rank, Dtype::Float32).is_err());
    assert!(lora::apply_lora(m.model.as_mut(), &mut config(&["q_proj"], 0), Dtype::Int32).is_err());
}

#[test]
fn save_then_load_gives_identical_outputs() {
    for name in ["llama-tiny", "gemma3-tiny", "qwen3-tiny-4bit"] {
        let mut m = load(name);
        let base = logits(m.model.as_ref());
        let cfg = attach(m.model.as_mut(), &["q_proj", "v_proj", "down_proj"], 7);
        let with = logits(m.model.as_ref());
        assert!(max_diff(&base, &with) > 1e-3, "{name}: the adapter should change the logits");
        let dir = tempfile::tempdir().unwrap();
        lora::save_adapter(m.model.as_mut(), dir.path(), &cfg).unwrap();
        let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["fine_tune_type"], "lora");
        assert_eq!(json["lora_parameters"]["rank"], 4);
        assert_eq!(json["lora_parameters"]["scale"], 2.0);

        let mut fresh = load(name);
        let back = lora::load_adapter(fresh.model.as_mut(), dir.path()).unwrap();
        assert_eq!(back.lora_parameters, cfg.lora_parameters);
        assert_eq!(logits(fresh.model.as_ref()), with, "{name}: reloaded adapter differs");
        // Removing it gives the base model back.
        assert_eq!(lora::remove_lora(fresh.model.as_mut()), 3 * fresh.model.num_layers());
        assert_eq!(logits(fresh.model.as_ref()), base, "{name}: removing the adapter");
    }
}

#[test]
fn fused_dense_model_equals_base_plus_adapter_and_saves_standalone() {
    let mut m = load("llama-tiny");
    attach(m.model.as_mut(), &["q_proj", "v_proj", "o_proj", "gate_proj"], 3);
    let with = logits(m.model.as_ref());
    let out = tempfile::tempdir().unwrap();
    let fused = lora::fuse_and_save(&mut m, out.path(), &[], lora::IfExists::Refuse).unwrap();
    assert_eq!(fused.len(), 4 * m.model.num_layers());
    let in_memory = logits(m.model.as_ref());
    assert!(max_diff(&with, &in_memory) < 1e-4, "fused in memory differs by {}", max_diff(&with, &in_memory));
    assert!(lora::lora_weights(m.model.as_mut()).is_empty(), "fusing detaches the adapter");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(out.path().join(f).is_file(), "{f} is missing from the fused model");
    }
    let reloaded = model::load(out.path()).unwrap();
    assert_eq!(logits(reloaded.model.as_ref()), in_memory, "the saved fused model differs");
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn fusing_into_an_occupied_directory_is_refused_unless_replaced_and_then_nothing_stale_is_left() {
    // The base, with a stamp of its own that must never reach the fused model.
    let base = common::copy_tiny_model("llama-tiny");
    std::fs::write(base.path().join(".mlxr-stamp.json"), r#"{"sha256": "of the base's files"}"#).unwrap();
    let mut m = model::load(base.path()).unwrap();
    attach(m.model.as_mut(), &["q_proj", "v_proj"], 4);
    let with = logits(m.model.as_ref());

    // A directory that held another, sharded model: an index, shards, a stamp, a config.
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("fused");
    std::fs::create_dir(&out).unwrap();
    let stale = [
        ("config.json", "{\"model_type\": \"qwen3\"}"),
        ("model.safetensors.index.json", r#"{"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}"#),
        ("model-00002-of-00002.safetensors", "not weights"),
        (".mlxr-stamp.json", "{}"),
    ];
    for (f, text) in stale {
        std::fs::write(out.join(f), text).unwrap();
    }
    let before = names(&out);
    let err = lora::fuse_and_save(&mut m, &out, &[], lora::IfExists::Refuse).unwrap_err().to_string();
    assert!(err.contains(out.to_str().unwrap()) && err.contains("4 entries") && err.contains("config.json"), "{err}");
    assert!(err.contains("--force"), "says how to replace it: {err}");
    assert_eq!(names(&out), before, "a refused fuse touches nothing");
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), stale[0].1);
    assert!(!lora::lora_weights(m.model.as_mut()).is_empty(), "a refused fuse keeps the adapter attached");

    // The model directory itself, or one that contains it, is refused even when replacing.
    for target in [base.path(), base.path().parent().unwrap()] {
        let err = lora::fuse_and_save(&mut m, target, &[], lora::IfExists::Replace).unwrap_err().to_string();
        assert!(err.contains("model directory"), "{err}");
    }
    let keep = work.path().join("adapter");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("adapters.safetensors"), "x").unwrap();
    let err = lora::fuse_and_save(&mut m, &keep, &[("the adapter directory", &keep)], lora::IfExists::Replace)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is the adapter directory; write the fused model elsewhere"), "{err}");

    lora::fuse_and_save(&mut m, &out, &[], lora::IfExists::Replace).unwrap();
    let expected =
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"];
    assert_eq!(names(&out), expected, "the fused model and nothing else");
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        std::fs::read(base.path().join("config.json")).unwrap()
    );
    assert_eq!(names(work.path()), ["adapter", "fused"], "no staged or old directory is left beside it");
    let reloaded = model::load(&out).unwrap();
    let got = logits(reloaded.model.as_ref());
    assert!(max_diff(&with, &got) < 1e-4, "the fused model differs by {}", max_diff(&with, &got));
}

#[test]
fn fused_quantised_model_is_requantised_and_close_to_base_plus_adapter() {
    let mut m = load("llama-tiny-8bit");
    attach(m.model.as_mut(), &["q_proj", "v_proj"], 5);
    let with = logits(m.model.as_ref());
    // What mlx-lm's fuse computes for one layer: quantize(dequantize(W) + scale·(AB)ᵀ), same group size and bits.
    let expected = {
        let (_, lin) = m.model.linears_mut().into_iter().find(|(p, _)| p == "model.layers.0.self_attn.q_proj").unwrap();
        let LinearWeight::Quantized(q) = &lin.weight else { panic!("the fixture's q_proj is not quantised") };
        let w = ops::dequantize(q, None).unwrap();
        let delta = lin.lora.as_ref().unwrap().delta(w.dtype()).unwrap();
        let fused = ops::quantize(&ops::add(&w, &delta).unwrap(), q.group_size, q.bits).unwrap();
        (fused.weight.to_vec::<u32>().unwrap(), fused.scales.to_vec_f32().unwrap(), q.group_size, q.bits)
    };
    let out = tempfile::tempdir().unwrap();
    lora::fuse_and_save(&mut m, out.path(), &[], lora::IfExists::Refuse).unwrap();
    let mut reloaded = model::load(out.path()).unwrap();
    for (path, linear) in reloaded.model.linears_mut() {
        let LinearWeight::Quantized(q) = &linear.weight else { panic!("{path} is no longer quantised") };
        if path == "model.layers.0.self_attn.q_proj" {
            assert_eq!((q.group_size, q.bits), (expected.2, expected.3), "the group size and bits are kept");
            assert_eq!(
                q.weight.to_vec::<u32>().unwrap(),
                expected.0,
                "re-quantised weights differ from mlx-lm's recipe"
            );
            assert_eq!(q.scales.to_vec_f32().unwrap(), expected.1);
        }
    }
    let fused = logits(reloaded.model.as_ref());
    let scale = with.iter().map(|v| v.abs()).fold(0.0, f32::max);
    // 8-bit re-quantisation of the updated weights: close, not equal.
    assert!(max_diff(&with, &fused) < 0.05 * scale.max(1.0), "fused 8-bit differs by {}", max_diff(&with, &fused));
}

#[test]
fn an_adapter_for_another_model_is_rejected_with_every_mismatch_named() {
    let mut llama = load("llama-tiny");
    let cfg = attach(llama.model.as_mut(), &["q_proj", "v_proj"], 1);
    let dir = tempfile::tempdir().unwrap();
    lora::save_adapter(llama.model.as_mut(), dir.path(), &cfg).unwrap();
    let mut gemma = load("gemma3-tiny");
    let err = lora::load_adapter(gemma.model.as_mut(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("does not fit this model"), "{err}");
    assert!(err.contains("adapters.safetensors"), "{err}");
    assert!(lora::lora_weights(gemma.model.as_mut()).is_empty(), "a failed load leaves no adapter");

    // A tensor the model does not have.
    let mut w: BTreeMap<String, Array> = lora::lora_weights(llama.model.as_mut());
    w.insert("model.layers.0.self_attn.k_proj.lora_a".into(), Array::from_slice(&[0f32; 4], &[1, 4]).unwrap());
    mlx::io::save_safetensors(dir.path().join("adapters.safetensors"), w.iter(), &BTreeMap::new()).unwrap();
    let mut fresh = load("llama-tiny");
    let err = lora::load_adapter(fresh.model.as_mut(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("k_proj.lora_a: not an adapter parameter"), "{err}");
}

#[test]
fn missing_and_malformed_adapter_files_are_named() {
    let mut m = load("llama-tiny");
    let missing = Path::new("/nonexistent/adapter");
    let err = lora::load_adapter(m.model.as_mut(), missing).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/adapter"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let err = lora::load_adapter(m.model.as_mut(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json"), "{err}");

    std::fs::write(dir.path().join("adapter_config.json"), "{\"num_layers\": 2}").unwrap();
    let err = lora::load_adapter(m.model.as_mut(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("lora_parameters"), "{err}");

    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}}"#,
    )
    .unwrap();
    let err = lora::load_adapter(m.model.as_mut(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("dora"), "{err}");

    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}}"#,
    )
    .unwrap();
    let err = lora::load_adapter(m.model.as_mut(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("adapters.safetensors"), "{err}");

    let err = lora::save_adapter(m.model.as_mut(), dir.path(), &config(&["q_proj"], 0)).unwrap_err().to_string();
    assert!(err.contains("no adapter"), "{err}");
    let fused = lora::fuse_and_save(&mut m, &dir.path().join("out"), &[], lora::IfExists::Refuse);
    assert!(fused.is_err(), "fusing without an adapter");
    assert!(!dir.path().join("out").exists(), "a failed fuse leaves nothing");
}

fn greedy(model: &MetalModel) -> Vec<u32> {
    let settings = GenerateSettings::default().max_tokens(6).ignore_eos(true);
    let out = model.generate("hello there", &settings, CancelToken::new()).unwrap().complete().unwrap();
    out.tokens.iter().map(|t| t.id).collect()
}

#[test]
fn the_backend_loads_and_swaps_adapters_on_its_engine_thread() {
    let name = "llama-tiny";
    let mut m = load(name);
    let cfg = attach(m.model.as_mut(), &["q_proj", "v_proj", "up_proj", "down_proj"], 11);
    let dir = tempfile::tempdir().unwrap();
    lora::save_adapter(m.model.as_mut(), dir.path(), &cfg).unwrap();

    let settings = LoadSettings::default().device(inference_core::Device::Cpu);
    let base = MetalModel::load(&common::tiny_model(name), &settings).unwrap();
    let adapted = MetalModel::load(&common::tiny_model(name), &settings.clone().adapter_path(dir.path())).unwrap();
    let (base_ids, adapted_ids) = (greedy(&base), greedy(&adapted));
    adapted.set_adapter(None).unwrap();
    assert_eq!(greedy(&adapted), base_ids, "removing the adapter gives the base model's tokens");
    base.set_adapter(Some(dir.path())).unwrap();
    assert_eq!(greedy(&base), adapted_ids, "swapping the adapter in gives the adapted tokens");
    // A swap waits for the generations started before it, which finish with the old adapter.
    base.set_adapter(None).unwrap();
    let settings6 = GenerateSettings::default().max_tokens(6).ignore_eos(true);
    let running = base.generate("hello there", &settings6, CancelToken::new()).unwrap();
    base.set_adapter(Some(dir.path())).unwrap();
    let before: Vec<u32> = running.complete().unwrap().tokens.iter().map(|t| t.id).collect();
    assert_eq!(before, base_ids, "a generation started before the swap keeps the old adapter");
    assert_eq!(greedy(&base), adapted_ids);
    let err = base.set_adapter(Some(Path::new("/nonexistent/adapter"))).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/adapter"), "{err}");
    assert_eq!(greedy(&base), base_ids, "a failed swap leaves no adapter");
    let err = MetalModel::load(&common::tiny_model("gemma3-tiny"), &settings.adapter_path(dir.path()));
    assert!(err.is_err(), "an adapter for another model fails the load");
}
