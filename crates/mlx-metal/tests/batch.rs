// SPDX-License-Identifier: EUPL-1.2
//! Batched prefill and generation: every row of a left-padded batch equals
//! running its prompt alone, on every tiny fixture (sliding windows included).

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::ops::ControlFlow;

use mlx::array::Array;
use mlx::device::{Device, DeviceScope};
use mlx::ops;
use mlx_metal::batch;
use mlx_metal::generate::{self, LoopOptions};
use mlx_metal::model::{self, LanguageModel};
use mlx_metal::sample::{Sampler, SamplerConfig};

const MODELS: &[&str] =
    &["llama-tiny", "llama3-tiny", "qwen2-tiny", "qwen3-tiny", "gemma3-tiny", "qwen3-tiny-4bit", "llama-tiny-8bit"];

/// Prompts of different lengths (1 to 21 tokens): the longest crosses the
/// 8-token window of gemma3-tiny's sliding layers.
fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 99, 3, 42, 8, 11, 250, 31, 7, 64, 2, 90, 13, 18, 21, 40, 77, 5, 6, 9],
        vec![7],
        vec![12, 40, 3, 88, 19],
        vec![300, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    ]
}

fn greedy() -> Sampler {
    Sampler::new(SamplerConfig::default()).unwrap()
}

fn alone(model: &dyn LanguageModel, prompt: &[u32], sampler: &Sampler, max: usize) -> Vec<u32> {
    let mut caches = model.make_cache().unwrap();
    let opts = LoopOptions { max_tokens: max, ..LoopOptions::default() };
    let mut out = Vec::new();
    generate::generate(model, &mut caches, prompt, sampler, &opts, &|| false, |s| {
        out.push(s.id);
        Ok(ControlFlow::Continue(()))
    })
    .unwrap();
    out
}

fn batched(
    model: &dyn LanguageModel,
    prompts: &[Vec<u32>],
    sampler: &Sampler,
    max: &[usize],
    step: usize,
    stop_after: Option<(usize, usize)>,
) -> (Vec<Vec<u32>>, batch::BatchStats) {
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut out = vec![Vec::new(); prompts.len()];
    let stats = batch::generate(model, &refs, sampler, max, step, &|| false, |row, s| {
        out[row].push(s.id);
        Ok(match stop_after {
            Some((r, n)) if r == row && out[row].len() == n => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        })
    })
    .unwrap();
    (out, stats)
}

/// Loads each named tiny fixture and hands it to `check` with its name, all on the CPU.
fn on_cpu_with_each(names: &[&str], check: impl Fn(&str, &dyn LanguageModel)) {
    let _cpu = DeviceScope::new(Device::Cpu).unwrap();
    for name in names {
        let m = model::load(&common::tiny_model(name)).unwrap();
        check(name, m.model.as_ref());
    }
}

#[test]
fn every_row_of_a_batch_equals_its_prompt_alone() {
    on_cpu_with_each(MODELS, |name, model| {
        let sampler = greedy();
        let prompts = prompts();
        let expected: Vec<Vec<u32>> = prompts.iter().map(|p| alone(model, p, &sampler, 12)).collect();
        // One prefill chunk, and chunks of 4 columns.
        for step in [2048, 4] {
            let (got, stats) = batched(model, &prompts, &sampler, &[12; 4], step, None);
            assert_eq!(got, expected, "{name}, prefill step {step}");
            assert_eq!(stats.generated_tokens, 48);
            assert_eq!(stats.prompt_tokens, 40);
            assert!(!stats.cancelled);
        }
    });
}

#[test]
fn rows_that_finish_early_leave_the_others_unchanged() {
    on_cpu_with_each(&["gemma3-tiny", "qwen3-tiny"], |name, model| {
        let sampler = greedy();
        let prompts = prompts();
        let limits = [3, 14, 0, 9];
        let expected: Vec<Vec<u32>> = prompts.iter().zip(limits).map(|(p, n)| alone(model, p, &sampler, n)).collect();
        // Row 1 also stops itself after 5 tokens (as EOS would).
        let (got, stats) = batched(model, &prompts, &sampler, &limits, 2048, Some((1, 5)));
        assert_eq!(got[0], expected[0], "{name}");
        assert_eq!(got[1], expected[1][..5], "{name}");
        assert!(got[2].is_empty());
        assert_eq!(got[3], expected[3], "{name}");
        assert_eq!(stats.generated_tokens, 3 + 5 + 9);
    });
}

#[test]
fn the_repetition_penalty_is_applied_per_row() {
    on_cpu_with_each(&["llama-tiny"], |_, model| {
        let sampler = Sampler::new(SamplerConfig {
            repetition_penalty: 1.5,
            repetition_context_size: 6,
            ..SamplerConfig::default()
        })
        .unwrap();
        let prompts = prompts();
        let expected: Vec<Vec<u32>> = prompts.iter().map(|p| alone(model, p, &sampler, 10)).collect();
        let (got, _) = batched(model, &prompts, &sampler, &[10; 4], 2048, None);
        assert_eq!(got, expected);
    });
}

#[test]
fn batched_prefill_logits_match_a_single_prefill() {
    on_cpu_with_each(&["gemma3-tiny", "llama3-tiny"], |name, model| {
        let prompts = prompts();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let pre = batch::prefill(model, &refs, 2048, &|| false).unwrap().unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let mut caches = model.make_cache().unwrap();
            let ids: Vec<i32> = p.iter().map(|&t| t as i32).collect();
            let x = Array::from_slice(&ids, &[1, ids.len() as i32]).unwrap();
            let logits = model.forward(&x, &mut caches).unwrap();
            let len = logits.dim(1).unwrap();
            let single = ops::slice_axis(&logits, 1, len - 1, len).unwrap().to_vec_f32().unwrap();
            let row = ops::slice_axis(&pre.logits, 0, i as i32, i as i32 + 1).unwrap().to_vec_f32().unwrap();
            let worst = single.iter().zip(&row).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{name} row {i}: logits differ by {worst}");
        }
    });
}

#[test]
fn bad_batches_are_rejected_with_the_reason() {
    on_cpu_with_each(&["llama-tiny"], |_, model| {
        let sampler = greedy();
        let none: Vec<&[u32]> = Vec::new();
        let e = batch::generate(model, &none, &sampler, &[], 2048, &|| false, |_, _| Ok(ControlFlow::Continue(())))
            .unwrap_err();
        assert!(e.to_string().contains("no prompts"), "{e}");
        let with_empty: Vec<&[u32]> = vec![&[1, 2], &[]];
        let e = batch::generate(model, &with_empty, &sampler, &[4, 4], 2048, &|| false, |_, _| {
            Ok(ControlFlow::Continue(()))
        })
        .unwrap_err();
        assert!(e.to_string().contains("prompt 1"), "{e}");
        let e = batch::generate(model, &[&[1u32, 2][..]], &sampler, &[4, 4], 2048, &|| false, |_, _| {
            Ok(ControlFlow::Continue(()))
        })
        .unwrap_err();
        assert!(e.to_string().contains("token limits"), "{e}");
    });
}

#[test]
fn a_cancelled_batch_stops_and_says_so() {
    on_cpu_with_each(&["qwen3-tiny"], |_, model| {
        let prompts = prompts();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let count = std::cell::Cell::new(0usize);
        let cancelled = || count.get() >= 8;
        let stats = batch::generate(model, &refs, &greedy(), &[50; 4], 2048, &cancelled, |_, _| {
            count.set(count.get() + 1);
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        assert!(stats.cancelled);
        assert_eq!(stats.generated_tokens, 8, "two steps of four rows, then the cancel is seen");
    });
}
