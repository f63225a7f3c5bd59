// SPDX-License-Identifier: EUPL-1.2
//! Seeded sampling matches mlx-lm token for token.
//!
//! The goldens' `sampling` runs (llama-tiny in float32, gemma3-tiny in
//! bfloat16) were made by `mx.random.seed(seed)` and mlx-lm's `generate_step`
//! with `make_sampler(...)` and `make_logits_processors(...)`. Here the same
//! seed goes into this thread's MLX key sequence ([`Sampler::seed`]) and
//! [`generate`] runs with the same settings: the tokens must be identical,
//! which needs the same logits, the same filters and the same order of key
//! splits (one per categorical draw, step n+1's draw queued before token n is
//! read, as in `generate_step`).

use std::ops::ControlFlow;

use mlx::{Array, ops};
use mlx_metal::generate::{LoopOptions, generate};
use mlx_metal::model::{self, LanguageModel};
use mlx_metal::sample::{Sampler, SamplerConfig};
use parity::{Fixture, SampledRun, Tolerances};

/// The sampler settings of a run, as mlx-lm was given them.
fn config(run: &SampledRun) -> SamplerConfig {
    SamplerConfig {
        temperature: run.temperature,
        top_p: run.top_p,
        min_p: run.min_p,
        top_k: run.top_k,
        min_tokens_to_keep: run.min_tokens_to_keep,
        // No processor in mlx-lm; a penalty of 1 is the same as none.
        repetition_penalty: run.repetition_penalty.unwrap_or(1.0),
        repetition_context_size: run.repetition_context_size,
    }
}

/// Generates on this thread's key sequence as it stands; returns the tokens
/// with their log-probabilities.
fn draw(model: &dyn LanguageModel, prompt: &[u32], cfg: SamplerConfig, n: usize) -> (Vec<u32>, Vec<f32>) {
    let sampler = Sampler::new(cfg).unwrap();
    let mut caches = model.make_cache().unwrap();
    let opts = LoopOptions { max_tokens: n, ..LoopOptions::default() };
    let (mut tokens, mut logprobs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    generate(model, &mut caches, prompt, &sampler, &opts, &|| false, |step| {
        tokens.push(step.id);
        let lp = ops::take(step.logprobs, &Array::scalar(step.id as i32), 0)?;
        logprobs.push(lp.to_vec_f32()?[0]);
        Ok(ControlFlow::Continue(()))
    })
    .unwrap();
    (tokens, logprobs)
}

/// Seeds this thread's key sequence, then [`draw`]s.
fn sample(model: &dyn LanguageModel, prompt: &[u32], seed: u64, cfg: SamplerConfig, n: usize) -> (Vec<u32>, Vec<f32>) {
    Sampler::seed(seed).unwrap();
    draw(model, prompt, cfg, n)
}

fn check(name: &str) {
    // The goldens are mlx-lm's draws on MLX's CPU; other devices round
    // differently (TF32 matmuls, other kernels), which changes later draws.
    let _cpu = mlx::device::DeviceScope::new(mlx::Device::Cpu).unwrap();
    let fixture = Fixture::load(name).unwrap_or_else(|e| panic!("{e}"));
    let runs = &fixture.golden.sampling;
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    for want in ["temp", "top_p", "top_k", "min_p", "combined", "greedy_penalty", "sampled_penalty"] {
        assert!(names.contains(&want), "{name}: no `{want}` sampling run in {names:?}");
    }
    let tol = Tolerances::for_golden(&fixture.golden).logprobs;
    let loaded = model::load(&fixture.model_dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut failures = Vec::new();
    for run in runs {
        let (tokens, logprobs) = sample(loaded.model.as_ref(), &run.prompt, run.seed, config(run), run.max_tokens);
        if let Some(i) = (0..run.max_tokens).find(|&i| tokens.get(i) != run.tokens.get(i)) {
            failures.push(format!(
                "{name} `{}` (seed {}, {:?}): first different token at step {i}: mlx-lm {} (log-prob {}), \
                 ours {:?} (log-prob {:?})\n  mlx-lm: {:?}\n  ours:   {:?}",
                run.name,
                run.seed,
                config(run),
                run.tokens[i],
                run.logprobs[i],
                tokens.get(i),
                logprobs.get(i),
                run.tokens,
                tokens,
            ));
            continue;
        }
        for (i, (&want, &got)) in run.logprobs.iter().zip(&logprobs).enumerate() {
            if !tol.accepts(f64::from(want), f64::from(got)) {
                failures.push(format!(
                    "{name} `{}`: log-probability of step {i} (token {}) is {got}, mlx-lm's {want} (allowed {})",
                    run.name,
                    tokens[i],
                    tol.allowed(f64::from(want))
                ));
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn llama_tiny_f32_samples_like_mlx_lm() {
    check("llama-tiny");
}

#[test]
fn gemma3_tiny_bf16_samples_like_mlx_lm() {
    check("gemma3-tiny");
}

#[test]
fn a_seed_replays_and_another_seed_differs() {
    let fixture = Fixture::load("llama-tiny").unwrap_or_else(|e| panic!("{e}"));
    let loaded = model::load(&fixture.model_dir).unwrap();
    let prompt = &fixture.golden.sampling[0].prompt;
    let cfg = SamplerConfig { temperature: 1.0, ..SamplerConfig::default() };
    let m = loaded.model.as_ref();
    let (a, _) = sample(m, prompt, 7, cfg.clone(), 16);
    let (b, _) = sample(m, prompt, 7, cfg.clone(), 16);
    let (c, _) = sample(m, prompt, 8, cfg, 16);
    assert_eq!(a, b, "the same seed must draw the same tokens");
    assert_ne!(a, c, "another seed should draw other tokens from a float32 model this varied");
}

#[test]
fn draws_on_another_thread_leave_this_threads_sequence_alone() {
    // MLX's key sequence is per thread (as mlx-lm's is per Python thread):
    // seeding here, then sampling on another thread with another seed, does
    // not move this thread's sequence.
    let fixture = Fixture::load("llama-tiny").unwrap_or_else(|e| panic!("{e}"));
    let run = fixture.golden.sampling.iter().find(|r| r.name == "temp").expect("a `temp` run");
    let loaded = model::load(&fixture.model_dir).unwrap();
    Sampler::seed(run.seed).unwrap();
    let (dir, prompt, cfg, n) = (fixture.model_dir.clone(), run.prompt.clone(), config(run), run.max_tokens);
    let other = std::thread::spawn(move || {
        let loaded = model::load(&dir).unwrap();
        sample(loaded.model.as_ref(), &prompt, 12345, cfg, n).0
    })
    .join()
    .unwrap();
    assert_ne!(other, run.tokens, "another seed should draw other tokens");
    let (here, _) = draw(loaded.model.as_ref(), &run.prompt, config(run), run.max_tokens);
    assert_eq!(here, run.tokens);
}
