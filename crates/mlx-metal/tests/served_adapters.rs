// SPDX-License-Identifier: EUPL-1.2
//! LoRA adapters served beside a model (`AdapterHost`): each adapter's model
//! gives the tokens of the base model loaded with that adapter, the base
//! model is unchanged, adapters and base run at the same time and each row
//! still gives what it gives alone, the base weights are shared (memory grows
//! by the adapter, not by a model), and closing an adapter refuses new work
//! and lets running work finish.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::path::Path;

use inference_core::{CancelToken, Error as CoreError, GenerateSettings, LoadSettings, TextModel};
use mlx::{Dtype, random};
use mlx_metal::MetalModel;
use mlx_metal::lora::{self, AdapterConfig, LoraParameters};
use mlx_metal::model;

/// Writes an adapter for `model_dir` into `out` whose `B` is random, so it changes the output.
fn write_adapter(model_dir: &Path, out: &Path, keys: &[&str], rank: i32, seed: u64) {
    let mut m = model::load(model_dir).unwrap();
    random::seed(seed).unwrap();
    let keys = Some(keys.iter().map(|k| (*k).to_string()).collect());
    let mut cfg = AdapterConfig::new(0, LoraParameters { rank, scale: 2.0, dropout: 0.0, keys });
    lora::apply_lora(m.model.as_mut(), &mut cfg, Dtype::Float32).unwrap();
    let mut w = lora::lora_weights(m.model.as_mut());
    for (name, a) in w.iter_mut() {
        if name.ends_with("lora_b") {
            *a = random::normal(&a.shape(), Dtype::Float32, 0.0, 0.05, None).unwrap();
        }
    }
    lora::set_lora_weights(m.model.as_mut(), &w).unwrap();
    lora::save_adapter(m.model.as_mut(), out, &cfg).unwrap();
}

fn settings() -> LoadSettings {
    // No prompt cache: its entries would count in the memory measured below.
    LoadSettings::default().device(inference_core::Device::Cpu).backend_option("prompt_cache_bytes", "0")
}

fn greedy(model: &dyn TextModel, prompt: &str) -> Vec<u32> {
    let settings = GenerateSettings::default().max_tokens(8).ignore_eos(true);
    let out = model.generate(prompt, &settings, CancelToken::new()).unwrap().complete().unwrap();
    out.tokens.iter().map(|t| t.id).collect()
}

fn active() -> usize {
    mlx::memory::active_memory().unwrap()
}

#[test]
fn served_adapters_equal_the_model_loaded_with_them_and_share_its_weights() {
    for (name, dir) in [("llama-tiny", Some(common::tiny_model("llama-tiny"))), ("smollm2", real())] {
        let Some(dir) = dir else { continue };
        let work = tempfile::tempdir().unwrap();
        let (a, b) = (work.path().join("a"), work.path().join("b"));
        write_adapter(&dir, &a, &["q_proj", "v_proj", "down_proj"], 8, 3);
        write_adapter(&dir, &b, &["k_proj", "o_proj", "gate_proj", "up_proj"], 4, 5);
        let prompt = "The capital of France is";

        let base = MetalModel::load(&dir, &settings()).unwrap();
        let base_ids = greedy(&base, prompt);
        let before = active();
        let host = inference_core::TextModel::adapter_host(&base).expect("the metal backend serves adapters");
        let served_a = host.load_adapter(&a).unwrap();
        let served_b = host.load_adapter(&b).unwrap();
        let (a_ids, b_ids) = (greedy(served_a.as_ref(), prompt), greedy(served_b.as_ref(), prompt));
        let after = active();
        assert_eq!(greedy(&base, prompt), base_ids, "{name}: the base model is unchanged");
        assert_ne!(a_ids, base_ids, "{name}: the adapter changes the output");
        assert_ne!(a_ids, b_ids, "{name}: each adapter gives its own output");

        // The same tokens while the base and both adapters run at once.
        let run = GenerateSettings::default().max_tokens(8).ignore_eos(true);
        let streams = [
            base.generate(prompt, &run, CancelToken::new()).unwrap(),
            served_a.generate(prompt, &run, CancelToken::new()).unwrap(),
            served_b.generate(prompt, &run, CancelToken::new()).unwrap(),
        ];
        let together: Vec<Vec<u32>> =
            streams.into_iter().map(|s| s.complete().unwrap().tokens.iter().map(|t| t.id).collect()).collect();
        assert_eq!(together, [base_ids.clone(), a_ids.clone(), b_ids.clone()], "{name}: together equals alone");

        // Memory: the adapters added their own weights, not another copy of the model's.
        let weights: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        let adapters = [&a, &b].iter().map(|d| d.join(lora::ADAPTER_FILE).metadata().unwrap().len()).sum::<u64>();
        let grown = after.saturating_sub(before) as u64;
        eprintln!(
            "{name}: weights on disk {weights} B, adapters on disk {adapters} B, active memory {before} B \
             -> {after} B with both adapters served (+{grown} B)"
        );
        assert!(grown < weights / 4, "{name}: serving two adapters grew memory by {grown} B (weights: {weights} B)");

        // Loaded with the adapter from the start: the same tokens.
        let closing = served_a.generate(prompt, &run, CancelToken::new()).unwrap();
        served_a.close().unwrap();
        let finished: Vec<u32> = closing.complete().unwrap().tokens.iter().map(|t| t.id).collect();
        assert_eq!(finished, a_ids, "{name}: a generation running when its adapter closes finishes");
        assert!(matches!(served_a.generate(prompt, &run, CancelToken::new()), Err(CoreError::Closed)));
        drop(served_b);
        assert_eq!(greedy(&base, prompt), base_ids, "{name}: the base model serves on after its adapters went");
        base.close().unwrap();
        let loaded = MetalModel::load(&dir, &settings().adapter_path(&a)).unwrap();
        assert_eq!(greedy(&loaded, prompt), a_ids, "{name}: a served adapter equals the model loaded with it");
    }
}

#[test]
fn adapters_that_do_not_fit_are_refused_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    let other = work.path().join("other");
    write_adapter(&common::tiny_model("gemma3-tiny"), &other, &["q_proj"], 4, 1);
    let base = MetalModel::load(&common::tiny_model("llama-tiny"), &settings()).unwrap();
    let host = inference_core::TextModel::adapter_host(&base).unwrap();
    for (dir, says) in [(other.as_path(), "does not fit"), (Path::new("/no/such/adapter"), "does not exist")] {
        match host.load_adapter(dir) {
            Err(CoreError::InvalidSetting { name, reason, .. }) => {
                assert_eq!(name, "adapter_path");
                assert!(reason.contains(says), "{reason}");
            }
            Err(e) => panic!("expected an invalid adapter_path, got {}", e.report()),
            Ok(_) => panic!("{} loaded", dir.display()),
        }
    }
    assert!(!greedy(&base, "hello").is_empty(), "the base model serves on");
}

fn real() -> Option<std::path::PathBuf> {
    common::real_model("smollm2-135m-instruct")
}
