// SPDX-License-Identifier: EUPL-1.2
//! Batch generation and classification through inference-core: every row
//! equals its prompt run alone (text, ids, scores), cancels keep what each
//! row has, and bad batches are refused with the reason.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::path::Path;

use inference_core::{
    CancelToken, Error as CoreError, GenerateSettings, LoadSettings, LogitsMode, Registry, TextModel,
};

fn load(path: &Path) -> Box<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    reg.load_model(path, &LoadSettings::default().backend("metal").device(inference_core::Device::Cpu))
        .unwrap_or_else(|e| panic!("loading {}: {}", path.display(), e.report()))
}

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Hi",
    "Write a haiku about the sea, then explain why the sea is salty in one short sentence:",
    "1, 2, 3, 4,",
    "Q: What colour is the sky on a clear day?\nA:",
];

fn check_batch_equals_alone(model: &dyn TextModel, settings: &GenerateSettings, what: &str) {
    let batch = model.batch_generate(PROMPTS, settings, CancelToken::new()).unwrap();
    assert_eq!(batch.len(), PROMPTS.len());
    let metrics = model.metrics();
    for (p, row) in PROMPTS.iter().zip(&batch) {
        assert!(row.error.is_none(), "{what}: {p:?}: {:?}", row.error);
        let alone = model.generate(p, settings, CancelToken::new()).unwrap().complete().unwrap();
        let ids: Vec<u32> = row.tokens.iter().map(|t| t.id).collect();
        let alone_ids: Vec<u32> = alone.tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, alone_ids, "{what}: {p:?}");
        assert_eq!(row.text(), alone.text, "{what}: {p:?}");
        assert!(!ids.is_empty(), "{what}: {p:?} produced nothing");
    }
    let generated: usize = batch.iter().map(|r| r.tokens.len()).sum();
    assert!(metrics.generated_tokens >= generated, "{what}: metrics count {metrics:?}");
    assert!(metrics.decode_tokens_per_sec > 0.0 && metrics.prefill_tokens_per_sec > 0.0, "{what}: {metrics:?}");
}

#[test]
fn batch_generate_equals_each_prompt_alone_on_the_fixtures() {
    for name in ["qwen3-tiny", "gemma3-tiny", "llama3-tiny", "llama-tiny-8bit"] {
        let model = load(&common::tiny_model(name));
        let settings = GenerateSettings::default().max_tokens(10).ignore_eos(true);
        check_batch_equals_alone(model.as_ref(), &settings, name);
        // Stop strings and EOS end rows at different steps.
        let settings = GenerateSettings::default().max_tokens(10).stop_strings(["e"]);
        check_batch_equals_alone(model.as_ref(), &settings, name);
    }
}

#[test]
fn batch_generate_equals_each_prompt_alone_on_real_models() {
    for name in ["smollm2-135m-instruct", "gemma3-270m"] {
        let Some(dir) = common::real_model(name) else { continue };
        let model = load(&dir);
        let settings = GenerateSettings::default().max_tokens(12);
        check_batch_equals_alone(model.as_ref(), &settings, name);
    }
}

#[test]
fn more_prompts_than_one_batch_holds_keep_their_order() {
    let model = load(&common::tiny_model("qwen3-tiny"));
    let prompts: Vec<String> = (0..mlx_metal::backend::MAX_BATCH + 3).map(|i| "word ".repeat(i % 7 + 1)).collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let settings = GenerateSettings::default().max_tokens(4).ignore_eos(true);
    let batch = model.batch_generate(&refs, &settings, CancelToken::new()).unwrap();
    for (p, row) in refs.iter().zip(&batch) {
        let alone = model.generate(p, &settings, CancelToken::new()).unwrap().complete().unwrap();
        assert_eq!(row.text(), alone.text, "{p:?}");
    }
}

#[test]
fn classify_equals_each_prompt_alone() {
    for name in ["gemma3-tiny", "qwen2-tiny"] {
        let model = load(&common::tiny_model(name));
        let settings = GenerateSettings::default().logits(LogitsMode::Logits);
        let all = model.classify(PROMPTS, &settings, CancelToken::new()).unwrap();
        assert_eq!(all.len(), PROMPTS.len());
        for (p, r) in PROMPTS.iter().zip(&all) {
            let one = model.classify(&[p], &settings, CancelToken::new()).unwrap().remove(0);
            assert_eq!(r.token.id, one.token.id, "{name}: {p:?}");
            assert_eq!(r.token.text, one.token.text);
            let (a, b) = (r.logits.as_ref().unwrap(), one.logits.as_ref().unwrap());
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{name}: {p:?}: logits differ by {worst}");
            // The token is the most likely one (greedy).
            let best = a.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
            assert_eq!(best as u32, r.token.id);
        }
    }
}

#[test]
fn a_cancelled_batch_returns_what_each_row_has() {
    let model = load(&common::tiny_model("llama-tiny"));
    let cancel = CancelToken::new();
    cancel.cancel();
    let batch =
        model.batch_generate(PROMPTS, &GenerateSettings::default().max_tokens(50).ignore_eos(true), cancel).unwrap();
    assert_eq!(batch.len(), PROMPTS.len());
    for row in &batch {
        assert!(matches!(row.error, Some(CoreError::Cancelled)), "{:?}", row.error);
        assert!(row.tokens.len() < 50);
    }
    // A deadline that expires part-way: rows keep the tokens they had.
    let cancel = CancelToken::with_timeout(std::time::Duration::from_millis(300));
    let batch = model
        .batch_generate(PROMPTS, &GenerateSettings::default().max_tokens(100_000).ignore_eos(true), cancel)
        .unwrap();
    for row in &batch {
        assert!(matches!(row.error, Some(CoreError::Cancelled)), "{:?}", row.error);
        assert!(row.tokens.len() < 100_000);
    }
}

#[test]
fn bad_batches_give_clear_errors() {
    let model = load(&common::tiny_model("llama-tiny"));
    let s = GenerateSettings::default().max_tokens(3);
    let e = model.batch_generate(&[], &s, CancelToken::new()).unwrap_err();
    assert!(e.to_string().contains("no prompts"), "{e}");
    let e = model.classify(&[], &s, CancelToken::new()).unwrap_err();
    assert!(e.to_string().contains("no prompts"), "{e}");
    // An empty prompt fails in its own row; the others run.
    let batch = model.batch_generate(&["hello", "", "world"], &s, CancelToken::new()).unwrap();
    assert!(batch[0].is_ok() && batch[2].is_ok());
    assert!(matches!(batch[1].error, Some(CoreError::EmptyPrompt)), "{:?}", batch[1].error);
    let e = model.classify(&["hello", ""], &s, CancelToken::new()).unwrap_err();
    assert!(matches!(e, CoreError::EmptyPrompt), "{e}");
    let e = model.batch_generate(&["hello"], &s.clone().temperature(-1.0), CancelToken::new()).unwrap_err();
    assert!(e.to_string().contains("temperature"), "{e}");
}
