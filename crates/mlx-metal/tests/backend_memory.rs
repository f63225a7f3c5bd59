// SPDX-License-Identifier: EUPL-1.2
//! Memory over a long generation through the "metal" backend. MLX's memory
//! figures are the process's, so this test has a binary of its own: tests
//! running beside it in one process would move them.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use inference_core::{CancelToken, GenerateSettings, LoadSettings, Registry, TextModel};

fn load(name: &str) -> Box<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    reg.load_model(
        common::tiny_model(name),
        &LoadSettings::default().backend("metal").device(inference_core::Device::Cpu),
    )
    .unwrap_or_else(|e| panic!("loading {name}: {}", e.report()))
}

fn greedy(max: usize) -> GenerateSettings {
    GenerateSettings::default().max_tokens(max).ignore_eos(true)
}

#[test]
fn memory_stays_flat_over_two_thousand_tokens() {
    let model = load("llama-tiny");
    model.generate("warm up", &greedy(4), CancelToken::new()).unwrap().complete().unwrap();
    let idle = model.metrics().active_memory_bytes;
    let warm_up = model.engine_load().unwrap().prompt_cache_bytes as u64;
    let out = model.generate("memory", &greedy(2000), CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(out.tokens.len(), 2000);
    let m = model.metrics();
    // llama-tiny: 2 layers × (k + v) × 2 KV heads × 16 dims × f32, over 2,304 slots (9 steps of 256).
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::tiny_model("llama-tiny").join("config.json")).unwrap())
            .unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap();
    let kv = cfg["num_key_value_heads"].as_u64().unwrap();
    let hd = cfg["hidden_size"].as_u64().unwrap() / cfg["num_attention_heads"].as_u64().unwrap();
    let slots = (2000u64 + m.prompt_tokens as u64).div_ceil(256) * 256;
    let kv_bytes = layers * 2 * kv * hd * slots * 4;
    // The prompt cache keeps a copy of the finished generation's positions, no more.
    let stored = model.engine_load().unwrap().prompt_cache_bytes as u64 - warm_up;
    let positions = (2000 + m.prompt_tokens - 1) as u64;
    assert_eq!(stored, layers * 2 * kv * hd * positions * 4, "the prompt cache holds the generation exactly");
    assert!(
        m.active_memory_bytes <= idle + kv_bytes + stored + 64 * 1024,
        "active {} > idle {} + KV cache {kv_bytes} + prompt cache {stored}",
        m.active_memory_bytes,
        idle
    );
    // The same generation again starts from the prompt cache and leaves it as big as it was.
    let again = model.generate("memory", &greedy(2000), CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(again.tokens, out.tokens);
    let m2 = model.metrics();
    assert_eq!(m2.cached_prompt_tokens, m.prompt_tokens - 1);
    assert_eq!(model.engine_load().unwrap().prompt_cache_bytes as u64, warm_up + stored);
    assert!(
        m2.active_memory_bytes <= m.active_memory_bytes + 64 * 1024,
        "{} then {}",
        m.active_memory_bytes,
        m2.active_memory_bytes
    );
}
