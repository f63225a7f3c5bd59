// SPDX-License-Identifier: EUPL-1.2
//! Parity with mlx-lm: every model fixture (the tiny random ones for every
//! architecture and variant, and the real Gemma 3 270M and SmolLM2 135M in
//! bf16, 8-bit and 4-bit) gives the golden logits within the tolerance of its
//! dtype and the golden greedy tokens. Each loads with the checkpoint's own
//! types, except the `<model>.float32` goldens (mlx-lm run after
//! `model.set_dtype(mx.float32)`), which load cast to float32 and are held to
//! float32's tolerances. Real models are skipped with a note unless
//! `MLXR_REQUIRE_REAL_MODELS=1` (set by `cargo xtask test`).

use std::ops::ControlFlow;

use mlx::{Array, ops};
use mlx_metal::generate::{LoopOptions, generate};
use mlx_metal::model::dtype::{DtypePolicy, QuantisedPolicy};
use mlx_metal::model::{self, LanguageModel};
use mlx_metal::sample::{Sampler, SamplerConfig};
use parity::{BoxError, Fixture, Greedy, ParityModel};

struct Metal {
    model: Box<dyn LanguageModel>,
}

impl ParityModel for Metal {
    fn logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, BoxError> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let x = Array::from_slice(&ids, &[1, ids.len() as i32])?;
        let mut caches = self.model.make_cache()?;
        let logits = self.model.forward(&x, &mut caches)?;
        let flat = logits.to_vec_f32()?;
        let vocab = logits.dim(-1)? as usize;
        Ok(flat.chunks(vocab).map(<[f32]>::to_vec).collect())
    }

    fn greedy(&mut self, prompt: &[u32], n: usize) -> Result<Greedy, BoxError> {
        let mut caches = self.model.make_cache()?;
        let sampler = Sampler::new(SamplerConfig::default())?;
        let opts = LoopOptions { max_tokens: n, ..LoopOptions::default() };
        let mut tokens = Vec::with_capacity(n);
        let mut logprobs = Vec::with_capacity(n);
        generate(self.model.as_ref(), &mut caches, prompt, &sampler, &opts, &|| false, |step| {
            tokens.push(step.id);
            let lp = ops::take(step.logprobs, &Array::scalar(step.id as i32), 0)?;
            logprobs.push(lp.to_vec_f32()?[0]);
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(Greedy { tokens, logprobs: Some(logprobs) })
    }
}

/// One fixture's report, or what went wrong with it (so a loop over
/// fixtures can name every one that fails, not only the first).
fn try_check(fixture: &Fixture) -> Result<String, String> {
    let name = &fixture.name;
    // The checkpoint's own types, unless mlx-lm was run cast to another (`<model>.float32`).
    let policy = match &fixture.golden.compute_dtype {
        None => DtypePolicy::Checkpoint,
        Some(dtype) => {
            DtypePolicy::Cast(mlx::Dtype::parse(dtype).ok_or_else(|| format!("{name}: compute_dtype {dtype:?}"))?)
        }
    };
    // mlx-lm's `set_dtype` never dequantises: quantised layers stay packed, as here.
    let loaded = model::load_with_quantised(&fixture.model_dir, None, policy, QuantisedPolicy::Keep)
        .map_err(|e| format!("{name}: {e}"))?;
    let (got, want) = (loaded.compute.dtype.name(), fixture.golden.run_dtype());
    if got != want {
        return Err(format!("{name}: computes in {got}, the golden in {want}"));
    }
    let mut m = Metal { model: loaded.model };
    let report = parity::check_model(fixture, &mut m).map_err(|e| format!("{name}: {e}"))?;
    if report.is_ok() { Ok(report.to_string()) } else { Err(report.to_string()) }
}

fn check(fixture: &Fixture) {
    match try_check(fixture) {
        Ok(report) => println!("{report}"),
        Err(failure) => panic!("{failure}"),
    }
}

/// Checks every fixture named, then fails naming each that did not match.
fn check_all(names: &[String], each: impl Fn(&Fixture) -> Result<(), String>) {
    let mut failures = Vec::new();
    for name in names {
        let outcome = Fixture::load(name).map_err(|e| format!("{name}: {e}")).and_then(|f| {
            each(&f)?;
            try_check(&f)
        });
        match outcome {
            Ok(report) => println!("{report}"),
            Err(failure) => failures.push(failure),
        }
    }
    assert!(failures.is_empty(), "{} of {} fixtures differ:\n{}", failures.len(), names.len(), failures.join("\n"));
}

/// The tiny fixtures' names: as mlx-lm loads them (`cast` false), or cast
/// after loading (`<model>.float32`).
fn tiny_names(cast: bool) -> Vec<String> {
    parity::tiny_fixture_names().unwrap().into_iter().filter(|n| n.contains('.') == cast).collect()
}

#[test]
fn tiny_fixtures_match_mlx_lm() {
    let names = tiny_names(false);
    assert!(names.len() >= 8, "expected every tiny variant, found {names:?}");
    check_all(&names, |_| Ok(()));
}

#[test]
fn tiny_16_bit_fixtures_computing_in_float32_match_mlx_lm_cast_to_float32() {
    let names = tiny_names(true);
    for want in ["gemma3-tiny.float32", "llama3-tiny.float32", "qwen3-tiny.float32", "qwen3-tiny-4bit.float32"] {
        assert!(names.iter().any(|n| n == want), "no golden {want} in {names:?}");
    }
    check_all(&names, |f| match f.golden.logits_dtype.as_str() {
        "float32" => Ok(()),
        other => Err(format!("{}: held to float32's tolerances, but its logits are {other}", f.name)),
    });
}

fn real(name: &str) {
    if let Some(f) = parity::real_fixture(name).unwrap() {
        check(&f);
    }
}

#[test]
fn smollm2_bf16_matches_mlx_lm() {
    real("smollm2-135m-instruct");
}

#[test]
fn smollm2_bf16_computing_in_float32_matches_mlx_lm_cast_to_float32() {
    real("smollm2-135m-instruct.float32");
}

#[test]
fn smollm2_8bit_matches_mlx_lm() {
    real("smollm2-135m-instruct-8bit");
}

#[test]
fn smollm2_4bit_matches_mlx_lm() {
    real("smollm2-135m-instruct-4bit");
}

#[test]
fn gemma3_270m_bf16_matches_mlx_lm() {
    real("gemma3-270m");
}

#[test]
fn gemma3_270m_8bit_matches_mlx_lm() {
    real("gemma3-270m-8bit");
}

#[test]
fn gemma3_270m_4bit_matches_mlx_lm() {
    real("gemma3-270m-4bit");
}

/// The stack as decode runs it (each block hands the next its input already
/// normed, [`LanguageModel::forward`]) gives bit for bit the logits of the
/// blocks run one by one with every norm of its own (as the prefill runs them:
/// `forward_layer`, then `head`), for a prompt and the step after it, in every tiny fixture
/// and the real 16-bit and quantised ones present. Our CUDA kernels are off
/// here (they sum in another order, and parity holds them to mlx-lm's
/// tolerances), so the check is exact on every device.
#[test]
fn the_chained_stack_equals_the_blocks_one_by_one() {
    let before = mlx::fast::custom_kernels();
    mlx::fast::set_custom_kernels(mlx::fast::CustomKernels::Off);
    let mut names = tiny_names(false);
    names.extend(["gemma3-270m", "gemma3-270m-4bit", "smollm2-135m-instruct-4bit"].map(String::from));
    let mut checked = 0;
    for name in names {
        let Some(fixture) = Fixture::load(&name).ok().filter(|f| f.model_dir.join("config.json").exists()) else {
            continue;
        };
        let m = model::load(&fixture.model_dir).unwrap_or_else(|e| panic!("{name}: {e}")).model;
        let prompt = Array::from_slice(&[1i32, 5, 9, 2, 7, 3], &[1, 6]).unwrap();
        let step = Array::from_slice(&[4i32], &[1, 1]).unwrap();
        let (mut chained, mut alone) = (m.make_cache().unwrap(), m.make_cache().unwrap());
        for (i, x) in [&prompt, &step].into_iter().enumerate() {
            let a = m.forward(x, &mut chained).unwrap().to_vec_f32().unwrap();
            let mut h = m.embed(x).unwrap();
            for (layer, cache) in alone.iter_mut().enumerate() {
                h = m.forward_layer(layer, &h, cache).unwrap();
            }
            let b = m.head(&h).unwrap().to_vec_f32().unwrap();
            assert_eq!(a.len(), fixture.golden.vocab_size * x.size(), "{name}");
            assert!(a == b, "{name}, pass {i}: the chained stack's logits differ from the blocks one by one");
        }
        checked += 1;
    }
    mlx::fast::set_custom_kernels(before);
    eprintln!("the chained stack checked on {checked} fixtures");
    assert!(checked >= 8, "checked {checked} fixtures");
}
