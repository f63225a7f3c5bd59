// SPDX-License-Identifier: EUPL-1.2
//! Checkpoint layouts: sharded files with an index, float16 weights, a path
//! to a file inside the model directory, nested text configs, and the errors
//! for broken indexes and quantisation sections.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use mlx::{Array, Dtype, io, ops};
use mlx_metal::model::{self, LanguageModel};

fn logits(m: &dyn LanguageModel) -> Vec<f32> {
    let ids = [2i32, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50];
    let x = Array::from_slice(&ids, &[1, ids.len() as i32]).unwrap();
    let mut caches = m.make_cache().unwrap();
    m.forward(&x, &mut caches).unwrap().to_vec_f32().unwrap()
}

fn err_of(dir: &Path) -> String {
    match model::load(dir) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sharded_checkpoint_with_index_equals_single_file() {
    let reference = logits(model::load(&common::tiny_model("llama-tiny")).unwrap().model.as_ref());
    let d = common::copy_tiny_model("llama-tiny");
    let st = d.path().join("model.safetensors");
    let all = io::load_safetensors(&st).unwrap();
    std::fs::remove_file(&st).unwrap();
    let names: Vec<&String> = all.tensors.keys().collect();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        let tensors = part.iter().map(|k| (k.as_str(), &all.tensors[*k]));
        io::save_safetensors(d.path().join(file), tensors, &BTreeMap::new()).unwrap();
        for k in part.iter() {
            map.insert((*k).clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(logits(model::load(d.path()).unwrap().model.as_ref()), reference);

    // A shard the index names but the directory lacks is an error naming it.
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = err_of(d.path());
    assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("missing"), "{e}");
}

#[test]
fn index_naming_a_path_outside_the_directory_is_refused() {
    let d = common::copy_tiny_model("llama-tiny");
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}});
    std::fs::write(d.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = err_of(d.path());
    assert!(e.contains("not a file in the model directory"), "{e}");
}

#[test]
fn float16_weights_load_and_run_close_to_float32() {
    let reference = logits(model::load(&common::tiny_model("llama-tiny")).unwrap().model.as_ref());
    let d = common::copy_tiny_model_with("llama-tiny", |tensors| {
        for v in tensors.values_mut() {
            *v = ops::astype(v, Dtype::Float16).unwrap();
        }
    });
    let got = logits(model::load(d.path()).unwrap().model.as_ref());
    let worst = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 0.1, "float16 logits differ from float32 by up to {worst}");
}

#[test]
fn a_file_inside_the_model_directory_is_accepted() {
    let by_dir = logits(model::load(&common::tiny_model("qwen2-tiny")).unwrap().model.as_ref());
    let by_file =
        logits(model::load(&common::tiny_model("qwen2-tiny").join("model.safetensors")).unwrap().model.as_ref());
    assert_eq!(by_dir, by_file);
}

#[test]
fn nested_text_config_equals_flat_config() {
    let flat = logits(model::load(&common::tiny_model("gemma3-tiny")).unwrap().model.as_ref());
    let nested = logits(model::load(&common::tiny_model("gemma3-tiny-mm")).unwrap().model.as_ref());
    assert_eq!(flat, nested);
}

#[test]
fn description_reports_the_model() {
    let d = model::load(&common::tiny_model("llama-tiny-8bit")).unwrap().model.description().clone();
    assert_eq!(d.architecture, "llama");
    assert_eq!((d.quant_bits, d.quant_group), (Some(8), Some(32)));
    let q = model::load(&common::tiny_model("qwen3-tiny")).unwrap().model.description().clone();
    assert_eq!((q.architecture.as_str(), q.quant_bits), ("qwen3", None));
}

#[test]
fn unsupported_quantisation_and_missing_model_type_are_errors() {
    let d = common::copy_tiny_model("llama-tiny");
    let cfg_path = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 128});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = err_of(d.path());
    assert!(e.contains("gptq"), "{e}");

    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::tiny_model("llama-tiny").join("config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("model_type");
    cfg.as_object_mut().unwrap().remove("architectures");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(err_of(d.path()).contains("no model_type"));

    std::fs::write(&cfg_path, "[1, 2, 3]").unwrap();
    assert!(err_of(d.path()).contains("not a JSON object"));
}

#[test]
fn a_tensor_nobody_reads_is_reported() {
    let d = common::copy_tiny_model_with("qwen2-tiny", |tensors| {
        tensors.insert("model.layers.0.mlp.extra_proj.weight".into(), Array::scalar(1.0f32));
    });
    let e = err_of(d.path());
    assert!(e.contains("extra_proj") && e.contains("not used"), "{e}");
}
