// SPDX-License-Identifier: EUPL-1.2
//! Crashes the fuzz targets found, each kept as a plain test with its exact input.

use std::collections::BTreeMap;

use mlx::{Array, Dtype, io, ops};
use mlx_metal::cache::RotatingKvCache;
use mlx_metal::session::{Fingerprint, SessionCache};

use crate::common::tiny_model;

/// Found by `session::mutated_session_files_are_refused_or_usable`: a session file whose
/// sliding-window layer holds 4-D keys but scalar values panicked while restoring the rotating
/// cache (its first three axes were compared by slicing a shape of none).
#[test]
fn a_rotating_cache_with_scalar_values_is_refused() {
    let keys = ops::zeros(&[1, 1, 8, 32], Dtype::Bfloat16).unwrap();
    let values = Array::scalar(0.0f32);
    let Err(e) = RotatingKvCache::from_state(keys, values, 20, 8, 0) else { panic!("scalar values were accepted") };
    assert!(e.to_string().contains("keys and values must be [B, H, L, D], got []"), "{e}");
}

/// The same, through a session file: gemma3-tiny's 20-token session with `layers.0.values`
/// (a sliding-window layer) replaced by a float32 scalar.
#[test]
fn a_session_file_with_scalar_values_is_refused() {
    let loaded = mlx_metal::model::load(&tiny_model("gemma3-tiny")).unwrap();
    let model = loaded.model.as_ref();
    let fingerprint = Fingerprint::new(model.description(), b"{}");
    let ids: Vec<u32> = (1..=20).map(|i| i * 7 % 300).collect();
    let mut session = SessionCache::new(model).unwrap();
    let inputs = Array::from_slice(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>(), &[1, 20]).unwrap();
    model.forward(&inputs, session.caches_mut()).unwrap().eval().unwrap();
    session.record(model, &ids, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    session.save(&path, &fingerprint).unwrap();
    let mut file = io::load_safetensors(&path).unwrap();
    file.tensors.insert("layers.0.values".into(), ops::zeros(&[], Dtype::Float32).unwrap());
    let tensors: BTreeMap<String, Array> = file.tensors;
    io::save_safetensors(&path, tensors.iter().map(|(k, a)| (k.as_str(), a)), &file.metadata).unwrap();
    let e = SessionCache::load(&path, model, &fingerprint).err().expect("an error");
    assert!(e.to_string().contains("layer 0: values of shape [] do not fit this model's [1, "), "{e}");
    // The sliding-window cache refuses them by itself too.
    let scalar = ops::zeros(&[], Dtype::Float32).unwrap();
    let Err(e) = mlx_metal::cache::RotatingKvCache::from_state(scalar.clone(), scalar, 20, 512, 0) else {
        panic!("scalar keys and values were accepted");
    };
    assert!(e.to_string().contains("must be [B, H, L, D]"), "{e}");
}

/// A copy of the fixture `name` whose config.json has `field` set to `value`, loaded.
fn load_with(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> mlx::Result<mlx_metal::model::LoadedModel> {
    let dir = crate::common::copy_tiny_model(name);
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    mlx_metal::model::load(dir.path())
}

/// Found by `config::size_fields_at_their_edges_load_or_are_refused`: `head_dim` 2147483647
/// overflowed `num_attention_heads × head_dim` (a panic in debug builds).
#[test]
fn a_head_dim_whose_projection_overflows_is_refused() {
    let e = load_with("llama-tiny", |c| c["head_dim"] = 2147483647.into()).err().expect("an error");
    assert!(e.to_string().contains("num_attention_heads × head_dim"), "{e}");
}

/// Predicted from reading the loaders, and confirmed: `num_hidden_layers` 2147483647 made
/// llama's and qwen2's loaders reserve room for that many blocks before reading any (an
/// allocation failure aborts the process).
#[test]
fn a_huge_layer_count_is_refused_before_anything_is_reserved() {
    for name in ["llama-tiny", "qwen2-tiny", "qwen3-tiny", "gemma3-tiny"] {
        let e = load_with(name, |c| c["num_hidden_layers"] = 2147483647.into()).err().expect("an error");
        let e = e.to_string();
        assert!(e.contains("missing tensor model.layers.") && e.contains(".self_attn."), "{name}: {e}");
    }
}

/// Found while fixing the above, and by `config::quantisation_entries_at_their_edges_...`: a
/// per-layer quantisation entry whose group size overflowed `group_size × groups` (a panic in
/// debug builds, in the load-time probe of the quantised matrices and in the layer's own check),
/// and a group size past `i32` that was cut to fit (`4294967360` read as 64).
#[test]
fn quantisation_entries_out_of_range_are_refused() {
    let layer = "model.layers.0.mlp.down_proj";
    let e = load_with("qwen3-tiny-4bit", |c| c["quantization"][layer] = serde_json::json!({"group_size": 2147483647}))
        .err()
        .expect("an error");
    assert!(e.to_string().contains("is not a 4-bit, group-2147483647 packing"), "{e}");
    let e = load_with("qwen3-tiny-4bit", |c| c["quantization"]["group_size"] = 4294967360u64.into())
        .err()
        .expect("an error");
    assert!(e.to_string().contains("quantization group_size = 4294967360 is out of range"), "{e}");
}
