// SPDX-License-Identifier: EUPL-1.2
//! Attention inspection: post-rope keys and queries per layer and head.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use inference_core::{CancelToken, Error as CoreError, LoadSettings, Registry, TextModel};
use mlx::fast::{self, RopeFreqs, RopeOffset};
use mlx::{Array, io, ops};

fn load(name: &str) -> Box<dyn TextModel> {
    Registry::new()
        .with(mlx_metal::backend::backend())
        .load_model(common::tiny_model(name), &LoadSettings::default().backend("metal"))
        .unwrap()
}

#[test]
fn snapshot_has_every_layer_head_and_position() {
    let model = load("gemma3-tiny");
    let inspector = model.attention_inspector().expect("the metal backend inspects attention");
    let prompt = "the quick brown fox jumps over the lazy dog and keeps on running";
    let snap = inspector.inspect_attention(prompt, CancelToken::new()).unwrap();
    assert_eq!(snap.architecture, "gemma3_text");
    assert_eq!((snap.num_layers, snap.num_heads, snap.num_query_heads, snap.head_dim), (4, 1, 4, 32));
    assert!(snap.seq_len > 8, "longer than the sliding window: {}", snap.seq_len);
    assert!(snap.has_queries());
    for layer in 0..snap.num_layers {
        assert_eq!(snap.keys[layer].len(), 1);
        assert_eq!(snap.queries[layer].len(), 4);
        assert_eq!(snap.key(layer, 0).unwrap().len(), snap.seq_len * snap.head_dim);
        assert_eq!(snap.query(layer, 3).unwrap().len(), snap.seq_len * snap.head_dim);
    }
    // Sliding layers (0, 1, 3) report the whole prompt too, not only their window.
    let json = serde_json::to_string(&snap).unwrap();
    assert!(json.contains("\"num_query_heads\":4"));
}

#[test]
fn layer_zero_keys_equal_a_hand_computed_projection() {
    let model = load("llama-tiny");
    let snap = model.attention_inspector().unwrap().inspect_attention("hello world", CancelToken::new()).unwrap();
    let ids: Vec<i32> = mlx_metal::tokenizer::Tokenizer::from_dir(common::tiny_model("llama-tiny"))
        .unwrap()
        .encode_prompt("hello world")
        .unwrap()
        .iter()
        .map(|&t| t as i32)
        .collect();
    let w = io::load_safetensors(common::tiny_model("llama-tiny").join("model.safetensors")).unwrap().tensors;
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::tiny_model("llama-tiny").join("config.json")).unwrap())
            .unwrap();
    let (kv, hd) = (snap.num_heads as i32, snap.head_dim as i32);
    let eps = cfg["rms_norm_eps"].as_f64().unwrap() as f32;
    let theta = cfg["rope_theta"].as_f64().unwrap() as f32;
    let x = ops::take(&w["model.embed_tokens.weight"], &Array::from_vec(&ids).unwrap(), 0).unwrap();
    let x = fast::rms_norm(&x, Some(&w["model.layers.0.input_layernorm.weight"]), eps).unwrap();
    let k = ops::matmul(&x, &ops::transpose(&w["model.layers.0.self_attn.k_proj.weight"], &[1, 0]).unwrap()).unwrap();
    let k = ops::transpose(&ops::reshape(&k, &[1, ids.len() as i32, kv, hd]).unwrap(), &[0, 2, 1, 3]).unwrap();
    let k = fast::rope(&k, hd, false, RopeFreqs::Base(theta), 1.0, RopeOffset::Fixed(0)).unwrap();
    let want = k.to_vec_f32().unwrap();
    let got: Vec<f32> = snap.keys[0].iter().flatten().copied().collect();
    assert_eq!(got.len(), want.len());
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "layer 0 keys differ by {worst}");
}

#[test]
fn a_prefix_has_the_same_keys_as_the_start_of_a_longer_prompt() {
    let model = load("qwen3-tiny");
    let ins = model.attention_inspector().unwrap();
    let short = ins.inspect_attention("one two three", CancelToken::new()).unwrap();
    let long = ins.inspect_attention("one two three four five six", CancelToken::new()).unwrap();
    let n = short.seq_len * short.head_dim;
    for layer in 0..short.num_layers {
        for head in 0..short.num_heads {
            let a = short.key(layer, head).unwrap();
            let b = &long.key(layer, head).unwrap()[..n];
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-2, "layer {layer} head {head}: {worst}");
        }
    }
}

#[test]
fn empty_prompt_and_cancelled_calls_are_errors() {
    let model = load("llama-tiny");
    let ins = model.attention_inspector().unwrap();
    assert!(matches!(ins.inspect_attention("", CancelToken::new()), Err(CoreError::EmptyPrompt)));
    let cancel = CancelToken::new();
    cancel.cancel();
    assert!(matches!(ins.inspect_attention("hello", cancel), Err(CoreError::Cancelled)));
}
