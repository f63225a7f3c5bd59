// SPDX-License-Identifier: EUPL-1.2
//! The compute type (`LoadSettings::dtype`): what `auto` chooses and says,
//! what an explicit type casts (every floating-point tensor, never packed
//! quantised weights), that the KV cache follows, and that generation through
//! the backend in float32 gives mlx-lm's greedy tokens in float32 (the
//! `<model>.float32` goldens; the logits are compared in tests/parity.rs).

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use inference_core::{CancelToken, ComputeDtype, Device, GenerateSettings, LoadSettings, Registry, TextModel};
use mlx::Dtype;
use mlx_metal::model;
use mlx_metal::model::dtype::DtypePolicy;

fn load(name: &str, dtype: ComputeDtype) -> Box<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let settings = LoadSettings::default().backend("metal").device(Device::Cpu).dtype(dtype);
    reg.load_model(common::tiny_model(name), &settings).unwrap_or_else(|e| panic!("loading {name}: {}", e.report()))
}

fn compute(name: &str, dtype: ComputeDtype) -> (String, String) {
    let info = load(name, dtype).info();
    (info.compute_dtype.expect("metal reports its compute type"), info.compute_dtype_reason.expect("and why"))
}

#[test]
fn auto_chooses_by_device_and_checkpoint_and_says_why() {
    // A bfloat16 checkpoint on the CPU: float32 on x86_64 with an optimised
    // BLAS, its own type elsewhere.
    let (dtype, reason) = compute("qwen3-tiny", ComputeDtype::Auto);
    if model::dtype::Host::this() == (model::dtype::Host { x86_64: true, optimised_blas: true }) {
        assert_eq!(dtype, "float32", "{reason}");
        assert!(reason.contains("x86_64 CPU"), "{reason}");
    } else {
        assert_eq!(dtype, "bfloat16", "{reason}");
    }
    assert!(reason.starts_with("auto: "), "{reason}");
    // A float32 checkpoint stays float32; a quantised one this small is kept
    // without measuring (tests/dequantise.rs measures SmolLM2's).
    assert_eq!(compute("llama-tiny", ComputeDtype::Auto).0, "float32");
    let (dtype, reason) = compute("qwen3-tiny-4bit", ComputeDtype::Auto);
    assert_eq!(dtype, "bfloat16", "{reason}");
    assert!(reason.starts_with("auto: kept quantised") && reason.contains("too small"), "{reason}");
    // An explicit type is what was asked for.
    for (setting, name) in
        [(ComputeDtype::Float32, "float32"), (ComputeDtype::Bfloat16, "bfloat16"), (ComputeDtype::Float16, "float16")]
    {
        let (dtype, reason) = compute("llama-tiny", setting);
        assert_eq!(dtype, name);
        assert!(reason.contains(&format!("dtype = {name} was asked for")), "{reason}");
    }
}

#[test]
fn the_kv_cache_follows_the_compute_type() {
    let bytes = |dtype| load("gemma3-tiny", dtype).engine_load().unwrap().kv_bytes_per_token;
    let (f32, bf16, f16) = (bytes(ComputeDtype::Float32), bytes(ComputeDtype::Bfloat16), bytes(ComputeDtype::Float16));
    assert_eq!(f32, 2 * bf16);
    assert_eq!(f16, bf16);
}

#[test]
fn a_cast_reaches_every_floating_point_tensor_but_not_packed_weights() {
    for (name, policy, want) in [
        ("qwen3-tiny", DtypePolicy::Cast(Dtype::Float32), Dtype::Float32),
        ("llama-tiny", DtypePolicy::Cast(Dtype::Float16), Dtype::Float16),
        ("qwen3-tiny-4bit", DtypePolicy::Cast(Dtype::Float16), Dtype::Float16),
        ("qwen3-tiny", DtypePolicy::Checkpoint, Dtype::Bfloat16),
    ] {
        let mut loaded = model::load_with(&common::tiny_model(name), None, policy).unwrap();
        assert_eq!(loaded.compute.dtype, want, "{name}");
        // The logits (and so every activation) come out in the compute type.
        let x = mlx::Array::from_slice(&[1i32, 2, 3], &[1, 3]).unwrap();
        let mut caches = loaded.model.make_cache().unwrap();
        assert_eq!(loaded.model.forward(&x, &mut caches).unwrap().dtype(), want, "{name}: logits");
        let narrow = model::dtype::narrow_tables(&loaded.compute, checkpoint(name), mlx::device::current().unwrap());
        assert_eq!(
            loaded.compute.reason.contains("the output head stay"),
            narrow.is_some(),
            "{}",
            loaded.compute.reason
        );
        let parts = loaded.model.parts_mut();
        // A 16-bit table stays in its type when the model computes in float32 on a CPU.
        if let mlx_metal::nn::LinearWeight::Dense(table) = &parts.embed_tokens.weight {
            let table_dtype = if narrow.is_some() { Dtype::Bfloat16 } else { want };
            assert_eq!(table.dtype(), table_dtype, "{name}: the embedding table");
        }
        let lin = &parts.layers[0].self_attn.q_proj;
        // Its layers keep a decode twin as stored where there is room.
        let twins = loaded.compute.reason.contains("decode steps read every layer as stored");
        assert!(!twins || narrow.is_some(), "{name}: {}", loaded.compute.reason);
        match &lin.narrow {
            Some(mlx_metal::nn::LinearWeight::Dense(t)) => {
                assert!(twins, "{name}: a twin only when the reason says so");
                assert_eq!(t.dtype(), Dtype::Bfloat16, "{name}: the twin");
            }
            Some(_) => panic!("{name}: a dense checkpoint's twin is dense"),
            None => assert!(!twins, "{name}: {}", loaded.compute.reason),
        }
        match &lin.weight {
            mlx_metal::nn::LinearWeight::Dense(w) => assert_eq!(w.dtype(), want, "{name}: q_proj"),
            mlx_metal::nn::LinearWeight::Quantized(q) => {
                assert_eq!(q.weight.dtype(), Dtype::Uint32, "{name}: packed weights are never cast");
                assert_eq!(q.scales.dtype(), want, "{name}: scales are");
            }
        }
    }
}

/// What the tiny checkpoints hold.
fn checkpoint(name: &str) -> model::dtype::CheckpointTypes {
    let quantised = name.ends_with("bit");
    let float = if name == "llama-tiny" { Dtype::Float32 } else { Dtype::Bfloat16 };
    model::dtype::CheckpointTypes { float, quantised }
}

/// Through the public API, a 16-bit model computing in float32 generates
/// what mlx-lm generates after `model.set_dtype(mx.float32)`.
#[test]
fn greedy_generation_in_float32_equals_mlx_lm_cast_to_float32() {
    for name in ["gemma3-tiny", "llama3-tiny"] {
        let fixture = parity::Fixture::load(&format!("{name}.float32")).unwrap();
        let run = fixture.golden.greedy.iter().find(|g| g.name == "pangram").expect("a pangram run");
        let model = load(name, ComputeDtype::Float32);
        let settings = GenerateSettings::default().max_tokens(run.max_tokens).ignore_eos(true);
        let stream = model.generate("The quick brown fox jumps over the lazy dog.", &settings, CancelToken::new());
        let done = stream.unwrap().complete().unwrap();
        assert_eq!(done.metrics.unwrap().prompt_tokens, run.prompt.len(), "{name}: the golden's prompt");
        let ids: Vec<u32> = done.tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, run.tokens, "{name}");
    }
}
