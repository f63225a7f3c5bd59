// SPDX-License-Identifier: EUPL-1.2
//! Parity with mlx-lm: every model fixture (the tiny random ones for every
//! architecture and variant, and the real Gemma 3 270M and SmolLM2 135M in
//! bf16, 8-bit and 4-bit) gives the golden logits within the tolerance of its
//! dtype and the golden greedy tokens. Real models are skipped with a note
//! unless `MLXR_REQUIRE_REAL_MODELS=1` (set by `cargo xtask test`).

use std::ops::ControlFlow;

use mlx::{Array, ops};
use mlx_metal::generate::{LoopOptions, generate};
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

fn check(fixture: &Fixture) {
    let loaded = model::load(&fixture.model_dir).unwrap_or_else(|e| panic!("{}: {e}", fixture.name));
    let mut m = Metal { model: loaded.model };
    let report = parity::check_model(fixture, &mut m).unwrap_or_else(|e| panic!("{}: {e}", fixture.name));
    assert!(report.is_ok(), "{report}");
    println!("{report}");
}

#[test]
fn tiny_fixtures_match_mlx_lm() {
    let names = parity::tiny_fixture_names().unwrap();
    assert!(names.len() >= 8, "expected every tiny variant, found {names:?}");
    for name in names {
        check(&Fixture::load(&name).unwrap());
    }
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
