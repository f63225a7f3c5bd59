// SPDX-License-Identifier: EUPL-1.2
//! The "metal" backend through inference-core: loading by name, streaming,
//! cancellation, metrics, model info and bad input, on the tiny fixtures.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use inference_core::{
    CancelToken, Error as CoreError, FinishReason, GenerateSettings, LoadSettings, LogitsMode, Message, Registry,
    TextModel,
};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn load(name: &str) -> Box<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    reg.load_model(
        common::tiny_model(name),
        &LoadSettings::default().backend("metal").device(inference_core::Device::Cpu),
    )
    .unwrap_or_else(|e| panic!("loading {name}: {}", e.report()))
}

fn golden(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(testdata().join("golden").join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn greedy(max: usize) -> GenerateSettings {
    GenerateSettings::default().max_tokens(max).ignore_eos(true)
}

#[test]
fn registers_as_metal_and_loads_by_name() {
    mlx_metal::register();
    assert!(inference_core::list().contains(&"metal".to_string()));
    let model = inference_core::load_model(common::tiny_model("llama-tiny"), &LoadSettings::default().backend("metal"))
        .unwrap();
    assert_eq!(model.model_type(), "llama");
}

#[test]
fn generates_the_golden_greedy_tokens_from_text() {
    for name in ["llama-tiny", "gemma3-tiny", "qwen3-tiny"] {
        let model = load(name);
        let g = golden(name);
        // The chat golden gives text and its token ids; generating from the
        // rendered text must start from exactly those ids.
        let chat = &g["chat"][0];
        let messages: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let stream = model.chat(&messages, &greedy(8), CancelToken::new()).unwrap();
        let out = stream.complete().unwrap();
        assert_eq!(out.tokens.len(), 8, "{name}");
        let metrics = out.metrics.expect("metrics after a finished stream");
        assert_eq!(metrics.prompt_tokens, chat["ids"].as_array().unwrap().len(), "{name}: prompt ids differ");
        assert_eq!(metrics.generated_tokens, 8);
    }
}

#[test]
fn streams_text_that_equals_decoding_the_ids() {
    let model = load("llama-tiny");
    let out = model.generate("the quick brown fox", &greedy(24), CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(out.tokens.len(), 24);
    let text: String = out.tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(text, out.text);
}

#[test]
fn cancelling_stops_the_generation_before_the_next_job() {
    let model = load("llama-tiny");
    let cancel = CancelToken::new();
    let mut stream = model.generate("once upon a time", &greedy(10_000), cancel.clone()).unwrap();
    for _ in 0..5 {
        stream.next().unwrap().unwrap();
    }
    cancel.cancel();
    let rest: Vec<_> = stream.by_ref().collect();
    assert!(matches!(rest.last(), Some(Err(CoreError::Cancelled))), "{rest:?}");
    // The engine does not wait for a reader (its streams are unbounded), so it may have run
    // ahead of this one; but a call that comes after the cancel finds the generation gone,
    // and the cancelled call's metrics say where it stopped.
    model.attention_inspector().unwrap().inspect_attention("x", CancelToken::new()).unwrap();
    let load = model.engine_load().unwrap();
    assert_eq!((load.running, load.batch_size), (0, 0), "{load:?}");
    let stopped_after = model.metrics().generated_tokens;
    assert!((5..10_000).contains(&stopped_after), "generation stopped after {stopped_after} tokens");
    // The engine is free again.
    let next = model.generate("hello", &greedy(2), CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(next.tokens.len(), 2);
}

#[test]
fn dropping_the_stream_stops_generation() {
    let model = load("qwen3-tiny");
    let mut stream = model.generate("hello there", &greedy(100_000), CancelToken::new()).unwrap();
    stream.next().unwrap().unwrap();
    drop(stream);
    // Were the engine still generating 100k tokens, this would not return promptly;
    // it runs after the dropped call on the same engine thread.
    let out = model.generate("hello", &greedy(3), CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(out.tokens.len(), 3);
    assert!(model.metrics().generated_tokens == 3);
}

#[test]
fn metrics_and_info_are_filled_in() {
    let model = load("gemma3-tiny");
    let info = model.info();
    assert_eq!(info.architecture, "gemma3_text");
    assert_eq!(info.vocab_size, 512);
    assert_eq!(info.num_layers, 4);
    assert_eq!(info.hidden_size, 64);
    assert_eq!(info.quant_bits, None);
    assert_eq!(info.context_length, Some(128));
    let out = model.generate("hello world", &greedy(10), CancelToken::new()).unwrap().complete().unwrap();
    let m = model.metrics();
    assert_eq!(Some(&m), out.metrics.as_ref());
    assert_eq!(m.generated_tokens, 10);
    assert!(m.prompt_tokens >= 2);
    assert!(m.prefill_duration.as_nanos() > 0 && m.decode_duration.as_nanos() > 0);
    assert!(m.decode_tokens_per_sec > 0.0 && m.prefill_tokens_per_sec > 0.0);
    assert!(m.peak_memory_bytes >= m.active_memory_bytes && m.active_memory_bytes > 0);
    let q = load("qwen3-tiny-4bit").info();
    assert_eq!((q.quant_bits, q.quant_group), (Some(4), Some(64)));
}

#[test]
fn stop_strings_and_stop_tokens_end_generation() {
    let model = load("llama-tiny");
    let full = model.generate("the quick brown fox", &greedy(20), CancelToken::new()).unwrap().complete().unwrap();
    // Stop at the fourth token's id: nothing from it onwards is yielded.
    let stop_id = full.tokens[3].id;
    let first = full.tokens.iter().position(|t| t.id == stop_id).unwrap();
    let s = greedy(20).stop_tokens(vec![stop_id]);
    let out = model.generate("the quick brown fox", &s, CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(out.tokens.len(), first);
    // A stop string taken from the middle of the text cuts the text before it.
    let text = full.text.clone();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() > 6 {
        let stop: String = chars[3..6].iter().collect();
        if !stop.trim().is_empty() {
            let s = greedy(20).stop_strings(vec![stop.clone()]);
            let out = model.generate("the quick brown fox", &s, CancelToken::new()).unwrap().complete().unwrap();
            let cut = text.find(&stop).unwrap();
            assert_eq!(out.text, text[..cut]);
        }
    }
}

#[test]
fn log_probabilities_on_request() {
    let model = load("llama-tiny");
    let s = greedy(3).logits(LogitsMode::LogProbs);
    let out = model.generate("hello", &s, CancelToken::new()).unwrap().complete().unwrap();
    for t in &out.tokens {
        let lps = t.logits.as_ref().unwrap();
        assert_eq!(lps.len(), 512);
        let best = lps.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(t.logprob.unwrap(), best, "greedy picks the most likely token");
        let total: f64 = lps.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((total - 1.0).abs() < 1e-3);
    }
}

#[test]
fn seeded_sampling_repeats() {
    let model = load("qwen2-tiny");
    let s = greedy(12).temperature(0.9).top_p(0.9).seed(7);
    let a = model.generate("hello", &s, CancelToken::new()).unwrap().complete().unwrap();
    let b = model.generate("hello", &s, CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(a.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), b.tokens.iter().map(|t| t.id).collect::<Vec<_>>());
}

#[test]
fn classify_and_batch_generate_match_single_runs() {
    let model = load("llama-tiny");
    let prompts = ["the quick brown fox", "hello", "a much longer prompt than the others here"];
    let classified = model.classify(&prompts, &GenerateSettings::default(), CancelToken::new()).unwrap();
    let batch = model.batch_generate(&prompts, &greedy(6), CancelToken::new()).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single = model.generate(p, &greedy(6), CancelToken::new()).unwrap().complete().unwrap();
        assert_eq!(classified[i].token.id, single.tokens[0].id, "prompt {i}");
        assert!(batch[i].error.is_none());
        assert_eq!(
            batch[i].tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
            single.tokens.iter().map(|t| t.id).collect::<Vec<_>>()
        );
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let model = load("llama-tiny");
    assert!(matches!(model.generate("", &greedy(4), CancelToken::new()), Err(CoreError::EmptyPrompt)));
    assert!(matches!(model.chat(&[], &greedy(4), CancelToken::new()), Err(CoreError::EmptyPrompt)));
    let bad = GenerateSettings::default().temperature(-1.0);
    assert!(matches!(model.generate("x", &bad, CancelToken::new()), Err(CoreError::InvalidSetting { .. })));
    let long = "word ".repeat(400);
    let err = model.generate(&long, &greedy(4), CancelToken::new()).unwrap_err();
    assert!(err.to_string().contains("context length"), "{err}");
    let small = Registry::new()
        .with(mlx_metal::backend::backend())
        .load_model(common::tiny_model("llama-tiny"), &LoadSettings::default().backend("metal").context_length(8))
        .unwrap();
    let err =
        small.generate("one two three four five six seven eight nine ten", &greedy(4), CancelToken::new()).unwrap_err();
    assert!(err.to_string().contains("context length of 8"), "{err}");
    model.close().unwrap();
    model.close().unwrap();
    assert!(matches!(model.generate("x", &greedy(1), CancelToken::new()), Err(CoreError::Closed)));
}

#[test]
fn a_generation_says_why_it_ended() {
    let reason = |model: &dyn TextModel, prompt: &str, settings: &GenerateSettings| {
        let out = model.generate(prompt, settings, CancelToken::new()).unwrap().complete().unwrap();
        let m = out.metrics.expect("metrics after a finished stream");
        (m.finish_reason, m.prompt_tokens, out.tokens)
    };
    let model = load("llama-tiny");
    let (why, _, tokens) = reason(model.as_ref(), "one two", &greedy(3));
    assert_eq!((why, tokens.len()), (Some(FinishReason::MaxTokens), 3));
    // A stop string the model writes ends it as the model's own stop.
    let stop = greedy(8).stop_strings([tokens[1].text.clone()]);
    let (why, _, tokens) = reason(model.as_ref(), "one two", &stop);
    assert_eq!(why, Some(FinishReason::Stop), "{tokens:?}");
    assert!(tokens.len() < 8, "{tokens:?}");
    // Asking for more than the context holds ends at the context, and says so.
    let small = Registry::new()
        .with(mlx_metal::backend::backend())
        .load_model(common::tiny_model("llama-tiny"), &LoadSettings::default().backend("metal").context_length(12))
        .unwrap();
    let (why, prompt, tokens) = reason(small.as_ref(), "one two", &greedy(64));
    assert_eq!(why, Some(FinishReason::ContextLength));
    assert_eq!(prompt + tokens.len(), 12, "the context is full");
    // Asking for exactly what is left is max_tokens, not the context.
    let (why, _, _) = reason(small.as_ref(), "one two", &greedy(12 - prompt));
    assert_eq!(why, Some(FinishReason::MaxTokens));
}

fn load_err(dir: &Path) -> String {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    match reg.load_model(dir, &LoadSettings::default().backend("metal")) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.report(),
    }
}

#[test]
fn broken_model_directories_fail_to_load_with_the_reason() {
    let missing = load_err(Path::new("/nonexistent/model"));
    assert!(missing.contains("/nonexistent/model"), "{missing}");

    let d = common::copy_tiny_model("llama-tiny");
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    assert!(load_err(d.path()).contains("not valid JSON"));

    let d = common::copy_tiny_model("llama-tiny");
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap().replace("\"llama\"", "\"mamba\"");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("unsupported architecture \"mamba\""), "{e}");

    let d = common::copy_tiny_model("llama-tiny");
    let st = d.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("truncated"), "{e}");

    let d = common::copy_tiny_model("llama-tiny");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert!(load_err(d.path()).contains("safetensors"));

    let d = common::copy_tiny_model("llama-tiny");
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["intermediate_size"] = serde_json::json!(100);
    std::fs::write(d.path().join("config.json"), v.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("mlp.gate_proj.weight has shape"), "{e}");

    let d = common::copy_tiny_model("llama-tiny");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    assert!(load_err(d.path()).contains("tokenizer.json"));
}

#[test]
fn wrong_dtype_and_missing_tensor_are_named() {
    let name = "model.layers.0.self_attn.q_proj.weight";
    let d = common::copy_tiny_model_with("llama-tiny", |tensors| {
        let w = tensors.get_mut(name).unwrap();
        *w = mlx::ops::astype(w, mlx::Dtype::Int32).unwrap();
    });
    let e = load_err(d.path());
    assert!(e.contains(name) && e.contains("int32"), "{e}");

    let d = common::copy_tiny_model_with("llama-tiny", |tensors| {
        tensors.remove(name);
    });
    let e = load_err(d.path());
    assert!(e.contains(&format!("missing tensor {name}")), "{e}");
}
