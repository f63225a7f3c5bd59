// SPDX-License-Identifier: EUPL-1.2
//! Dequantising a quantised checkpoint at load ([`model::dtype`]): which
//! layers become dense, that a dequantised model computes what the quantised
//! one computes (logits within rounding, the same greedy tokens, on the tiny
//! fixtures and the real 4-bit and 8-bit SmolLM2), and that `info()` reports
//! what `auto` measured and chose.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::path::Path;

use inference_core::{CancelToken, ComputeDtype, Device, GenerateSettings, LoadSettings, Registry, TextModel};
use mlx::Dtype;
use mlx_metal::model::dtype::{DtypePolicy, QuantisedPolicy};
use mlx_metal::model::{self, LoadedModel};
use mlx_metal::nn::LinearWeight;

fn load(dir: &Path, policy: DtypePolicy, quantised: QuantisedPolicy) -> LoadedModel {
    model::load_with_quantised(dir, None, policy, quantised).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The logits of `ids` (float32, flattened).
fn logits(m: &LoadedModel, ids: &[i32]) -> Vec<f32> {
    let x = mlx::Array::from_slice(ids, &[1, ids.len() as i32]).unwrap();
    let mut caches = m.model.make_cache().unwrap();
    let y = m.model.forward(&x, &mut caches).unwrap();
    mlx::ops::astype(&y, Dtype::Float32).unwrap().to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn argmax_rows(v: &[f32], vocab: usize) -> Vec<usize> {
    v.chunks(vocab)
        .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0)
        .collect()
}

fn is_dense(w: &LinearWeight, dtype: Dtype) -> bool {
    matches!(w, LinearWeight::Dense(a) if a.dtype() == dtype)
}

/// Dequantised float32 against quantised with float32 scales: both compute
/// `x · (scale · q + bias)` in float32 and differ only in the order of the
/// sums, so the logits agree to rounding. The bound is relative to the
/// largest logit: 1e-3 is ~100 float32 ulps of accumulated rounding over the
/// layers, far below any difference a wrong dequantisation makes (a wrong
/// scale or bit order changes logits by whole units).
fn check_agree(dir: &Path, name: &str) {
    let kept = load(dir, DtypePolicy::Cast(Dtype::Float32), QuantisedPolicy::Keep);
    let dense = load(dir, DtypePolicy::Cast(Dtype::Float32), QuantisedPolicy::Auto);
    assert!(dense.compute.dequantise && !kept.compute.dequantise, "{name}");
    let ids =
        [1, 504, 3458, 8127, 4299, 690, 260, 23790, 2767, 30].map(|i| i % kept.model.description().vocab_size as i32);
    let (a, b) = (logits(&kept, &ids), logits(&dense, &ids));
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    let diff = max_abs_diff(&a, &b);
    assert!(diff <= 1e-3 * scale, "{name}: logits differ by {diff} (largest logit {scale})");
    let vocab = kept.model.description().vocab_size;
    assert_eq!(argmax_rows(&a, vocab), argmax_rows(&b, vocab), "{name}: the greedy choice at every position");
}

#[test]
fn float32_dequantises_every_quantised_matrix_and_keep_keeps_them() {
    for name in ["qwen3-tiny-4bit", "llama-tiny-8bit"] {
        let dir = common::tiny_model(name);
        let mut dense = load(&dir, DtypePolicy::Cast(Dtype::Float32), QuantisedPolicy::Auto);
        assert_eq!((dense.compute.dtype, dense.compute.dequantise), (Dtype::Float32, true), "{name}");
        let narrow = mlx_metal::model::dtype::narrow_tables(
            &dense.compute,
            mlx_metal::model::dtype::CheckpointTypes { float: Dtype::Bfloat16, quantised: true },
            mlx::device::current().unwrap(),
        );
        let parts = dense.model.parts_mut();
        // On a CPU the table stays quantised (float32 scales; rows and head
        // products in float32), elsewhere it is dense float32 too.
        match &parts.embed_tokens.weight {
            LinearWeight::Quantized(q) => {
                assert!(narrow.is_some(), "{name}: the embedding is dense only off the CPU");
                assert_eq!(q.scales.dtype(), Dtype::Float32, "{name}: the embedding's scales");
            }
            w => assert!(narrow.is_none() && is_dense(w, Dtype::Float32), "{name}: the embedding"),
        }
        for b in &parts.layers {
            for l in [&b.self_attn.q_proj, &b.self_attn.o_proj, &b.mlp.gate_proj, &b.mlp.down_proj] {
                assert!(is_dense(&l.weight, Dtype::Float32), "{name}: a block's layer");
            }
        }
        let mut kept = load(&dir, DtypePolicy::Cast(Dtype::Float32), QuantisedPolicy::Keep);
        assert!(!kept.compute.dequantise, "{name}");
        match &kept.model.parts_mut().layers[0].self_attn.q_proj.weight {
            LinearWeight::Quantized(q) => assert_eq!(q.scales.dtype(), Dtype::Float32, "{name}"),
            LinearWeight::Dense(_) => panic!("{name}: quantised = keep dequantised"),
        }
        // The 16-bit types keep the packing unless asked to dequantise.
        let half = load(&dir, DtypePolicy::Cast(Dtype::Bfloat16), QuantisedPolicy::Auto);
        assert!(!half.compute.dequantise, "{name}: {}", half.compute.reason);
        let mut half = load(&dir, DtypePolicy::Cast(Dtype::Bfloat16), QuantisedPolicy::Dequantise);
        assert!(is_dense(&half.model.parts_mut().layers[0].mlp.up_proj.weight, Dtype::Bfloat16), "{name}");
        check_agree(&dir, name);
    }
}

#[test]
fn dequantised_smollm2_computes_what_the_quantised_one_does() {
    for name in ["smollm2-135m-instruct-4bit", "smollm2-135m-instruct-8bit"] {
        let Some(dir) = common::real_model(name) else { continue };
        check_agree(&dir, name);
    }
}

fn backend_load(
    dir: &Path,
    dtype: ComputeDtype,
    quantised: Option<&str>,
) -> inference_core::Result<Box<dyn TextModel>> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let mut settings = LoadSettings::default().backend("metal").device(Device::Cpu).dtype(dtype);
    if let Some(q) = quantised {
        settings = settings.backend_option("quantised", q);
    }
    reg.load_model(dir, &settings)
}

fn greedy_ids(model: &dyn TextModel) -> Vec<u32> {
    let settings = GenerateSettings::default().max_tokens(16).ignore_eos(true);
    let done = model.generate("The capital of France is", &settings, CancelToken::new()).unwrap().complete().unwrap();
    done.tokens.iter().map(|t| t.id).collect()
}

/// Through the public API: the same greedy tokens dequantised as quantised,
/// and `info()` says what `auto` measured and chose.
#[test]
fn a_dequantised_4_bit_smollm2_generates_the_quantised_greedy_tokens_and_info_says_why() {
    let Some(dir) = common::real_model("smollm2-135m-instruct-4bit") else { return };
    let kept = backend_load(&dir, ComputeDtype::Auto, Some("keep")).unwrap();
    let dense = backend_load(&dir, ComputeDtype::Float32, None).unwrap();
    let (ki, di) = (kept.info(), dense.info());
    assert_eq!(ki.compute_dtype.as_deref(), Some("float32"), "{ki:?}");
    assert!(ki.compute_dtype_reason.as_deref().is_some_and(|r| r.contains("quantised = keep")), "{ki:?}");
    assert!(di.compute_dtype_reason.as_deref().is_some_and(|r| r.contains("dequantised to dense float32")), "{di:?}");
    assert_eq!(greedy_ids(kept.as_ref()), greedy_ids(dense.as_ref()));
    drop((kept, dense));

    let auto = backend_load(&dir, ComputeDtype::Auto, None).unwrap();
    let info = auto.info();
    let reason = info.compute_dtype_reason.unwrap_or_default();
    assert_eq!(info.compute_dtype.as_deref(), Some("float32"), "{reason}");
    // What was measured (the layers, both sides' times) and what was chosen.
    for part in [" ms quantised, ", " ms dense through 211 layers (", "128 rows: ", "through a [576, 1536] 4-bit layer"]
    {
        assert!(reason.contains(part), "{part}: {reason}");
    }
    assert!(
        reason.starts_with("auto: quantised layers dequantised to dense float32")
            || reason.starts_with("auto: kept quantised"),
        "{reason}"
    );
    // The quantisation shown is the checkpoint's, whatever was chosen.
    assert_eq!((info.quant_bits, info.quant_group), (Some(4), Some(64)));
}

#[test]
fn a_bad_quantised_option_is_refused_with_its_name() {
    let err = backend_load(&common::tiny_model("qwen3-tiny-4bit"), ComputeDtype::Auto, Some("sometimes")).err();
    let text = err.map(|e| e.report()).unwrap_or_default();
    assert!(text.contains("quantised") && text.contains("sometimes"), "{text}");
}
