// SPDX-License-Identifier: EUPL-1.2
//! Continuous batching through the public API: requests that arrive while
//! others are decoding join their batch, and every request produces exactly
//! the tokens (ids, text, scores) it produces alone — whatever its prompt
//! length, sampling settings, seed, stop rule or token limit, on every tiny
//! fixture (Gemma's sliding windows and the quantised models included) and
//! on the real SmolLM2 and Gemma 3 270M. Cancelling one row, or a request
//! refused at the door, leaves the others as they were; many threads
//! calling at once are batched like a server's clients.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};

use inference_core::{
    CancelToken, Completion, Error as CoreError, GenerateSettings, LoadSettings, LogitsMode, Registry, TextModel,
    TokenStream,
};

fn load(path: &Path) -> Arc<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let model = reg
        .load_model(path, &LoadSettings::default().backend("metal").device(inference_core::Device::Cpu))
        .unwrap_or_else(|e| panic!("loading {}: {}", path.display(), e.report()));
    Arc::from(model)
}

/// Prompts of different lengths; the last is longer than Gemma's tiny window (8) many times over.
fn prompts() -> Vec<String> {
    vec![
        "The capital of France is".to_owned(),
        "Hi".to_owned(),
        "Write a haiku about the sea, then explain why the sea is salty in one short sentence:".to_owned(),
        "1, 2, 3, 4,".to_owned(),
        "Q: What colour is the sky on a clear day?\nA:".to_owned(),
        "once upon a time there was a little town by a river ".repeat(4),
        "a b c".to_owned(),
        "The quick brown fox jumps over the lazy dog.".to_owned(),
    ]
}

/// A different way of sampling and stopping for each request.
fn settings() -> Vec<GenerateSettings> {
    let s = GenerateSettings::default;
    vec![
        s().max_tokens(12).ignore_eos(true),
        s().max_tokens(10).temperature(0.8).seed(1).ignore_eos(true),
        s().max_tokens(9).temperature(1.0).top_k(5).seed(2).ignore_eos(true),
        s().max_tokens(11).temperature(0.7).top_p(0.9).min_p(0.05).seed(3),
        s().max_tokens(14).repetition_penalty(1.3).repetition_context_size(8).ignore_eos(true),
        s().max_tokens(20).stop_strings(["e"]),
        s().max_tokens(3).temperature(0.9).seed(4).logits(LogitsMode::LogProbs).ignore_eos(true),
        s().max_tokens(16).temperature(1.2).repetition_penalty(1.1).seed(5).ignore_eos(true),
    ]
}

fn ids(c: &Completion) -> Vec<u32> {
    c.tokens.iter().map(|t| t.id).collect()
}

/// `got` equals `alone`: ids, text and, where asked for, the scores.
fn assert_same(got: &Completion, alone: &Completion, what: &str) {
    assert_eq!(ids(got), ids(alone), "{what}: token ids");
    assert_eq!(got.text, alone.text, "{what}: text");
    for (a, b) in got.tokens.iter().zip(&alone.tokens) {
        match (a.logprob, b.logprob) {
            (Some(x), Some(y)) => assert!((x - y).abs() < 1e-4, "{what}: log-prob {x} vs {y}"),
            (None, None) => {}
            other => panic!("{what}: scores on one side only: {other:?}"),
        }
        if let (Some(x), Some(y)) = (&a.logits, &b.logits) {
            let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{what}: distributions differ by {worst}");
        }
    }
}

fn alone(model: &dyn TextModel, prompts: &[String], settings: &[GenerateSettings]) -> Vec<Completion> {
    prompts
        .iter()
        .zip(settings)
        .map(|(p, s)| model.generate(p, s, CancelToken::new()).unwrap().complete().unwrap())
        .collect()
}

/// Starts the requests one after another, each once the previous one has handed out a token
/// (so it joins a batch that is decoding), then reads them all to the end.
fn staggered(model: &dyn TextModel, prompts: &[String], settings: &[GenerateSettings]) -> Vec<Completion> {
    let mut started: Vec<(TokenStream, Vec<inference_core::Token>)> = Vec::new();
    for (p, s) in prompts.iter().zip(settings) {
        let mut stream = model.generate(p, s, CancelToken::new()).unwrap();
        let first: Vec<_> = stream.by_ref().take(1).map(|t| t.unwrap()).collect();
        started.push((stream, first));
    }
    started
        .into_iter()
        .map(|(mut stream, mut tokens)| {
            tokens.extend(stream.by_ref().map(|t| t.unwrap()));
            let text = tokens.iter().map(|t| t.text.as_str()).collect();
            Completion { tokens, text, metrics: stream.metrics().copied() }
        })
        .collect()
}

/// A generation that runs until it is dropped, so that every request made meanwhile shares its
/// decode steps (the engine never waits for a reader, so a short request could otherwise end
/// before the next one arrives).
fn anchor(model: &dyn TextModel) -> TokenStream {
    let long = GenerateSettings::default().max_tokens(100_000).ignore_eos(true);
    let mut stream = model.generate("and so on", &long, CancelToken::new()).unwrap();
    stream.next().unwrap().unwrap();
    stream
}

fn check_staggered_equals_alone(model: &dyn TextModel, what: &str) {
    let (prompts, settings) = (prompts(), settings());
    let expected = alone(model, &prompts, &settings);
    let before = model.engine_load().expect("the metal backend reports its load");
    let anchor = anchor(model);
    let got = staggered(model, &prompts, &settings);
    drop(anchor);
    // A call after the drop finds the anchor's row gone.
    model.generate("x", &GenerateSettings::default().max_tokens(1), CancelToken::new()).unwrap().complete().unwrap();
    for ((p, g), e) in prompts.iter().zip(&got).zip(&expected) {
        assert!(!e.tokens.is_empty(), "{what}: {p:?} produced nothing alone");
        assert_same(g, e, &format!("{what}: {p:?}"));
        assert_eq!(g.metrics.map(|m| m.generated_tokens), e.metrics.map(|m| m.generated_tokens), "{what}: {p:?}");
    }
    let after = model.engine_load().unwrap();
    assert!(after.peak_batch_size >= 2, "{what}: the requests never shared a decode step: {after:?}");
    assert!(after.decode_steps > before.decode_steps, "{what}: {after:?}");
    assert_eq!((after.queued, after.running, after.batch_size), (0, 0, 0), "{what}: the engine is idle again");
}

#[test]
fn staggered_requests_equal_each_alone_on_every_fixture() {
    for name in
        ["qwen3-tiny", "gemma3-tiny", "llama3-tiny", "llama-tiny", "llama-tiny-8bit", "qwen3-tiny-4bit", "qwen2-tiny"]
    {
        let model = load(&common::tiny_model(name));
        check_staggered_equals_alone(model.as_ref(), name);
    }
}

#[test]
fn staggered_requests_equal_each_alone_on_real_models() {
    for name in ["smollm2-135m-instruct", "gemma3-270m"] {
        let Some(dir) = common::real_model(name) else { continue };
        let model = load(&dir);
        check_staggered_equals_alone(model.as_ref(), name);
    }
}

#[test]
fn many_threads_calling_at_once_are_batched_and_each_equals_alone() {
    let model = load(&common::tiny_model("gemma3-tiny"));
    // More callers than one batch holds: the rest wait for room.
    let callers = mlx_metal::backend::MAX_BATCH + 4;
    let prompts: Vec<String> = (0..callers).map(|i| format!("{} {}", "story ".repeat(i % 5 + 1), i)).collect();
    let settings: Vec<GenerateSettings> = (0..callers)
        .map(|i| GenerateSettings::default().max_tokens(6 + i % 4).temperature(0.5).seed(i as u64).ignore_eos(true))
        .collect();
    let expected = alone(model.as_ref(), &prompts, &settings);
    let anchor = anchor(model.as_ref());
    let start = Arc::new(Barrier::new(callers));
    let threads: Vec<_> = (0..callers)
        .map(|i| {
            let (model, start) = (Arc::clone(&model), Arc::clone(&start));
            let (prompt, settings) = (prompts[i].clone(), settings[i].clone());
            std::thread::spawn(move || {
                start.wait();
                model.generate(&prompt, &settings, CancelToken::new()).unwrap().complete().unwrap()
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let got = t.join().expect("a caller thread panicked");
        assert_same(&got, &expected[i], &format!("caller {i}"));
    }
    drop(anchor);
    let load = model.engine_load().unwrap();
    assert!(load.peak_batch_size >= 2, "{load:?}");
    assert!(load.peak_batch_size <= load.max_batch, "{load:?}");
}

#[test]
fn cancelling_one_row_leaves_the_others_as_they_were() {
    let model = load(&common::tiny_model("qwen3-tiny"));
    let (prompts, settings) = (prompts(), settings());
    let long = GenerateSettings::default().max_tokens(10_000).ignore_eos(true);
    let expected = alone(model.as_ref(), &prompts[..4], &settings[..4]);
    // Two long generations join the batch first; one is cancelled, one dropped part-way.
    let cancel = CancelToken::new();
    let mut cancelled = model.generate("tell me everything", &long, cancel.clone()).unwrap();
    let mut dropped = model.generate("and more", &long, CancelToken::new()).unwrap();
    let streams: Vec<TokenStream> = prompts[..4]
        .iter()
        .zip(&settings[..4])
        .map(|(p, s)| model.generate(p, s, CancelToken::new()).unwrap())
        .collect();
    for _ in 0..3 {
        cancelled.next().unwrap().unwrap();
        dropped.next().unwrap().unwrap();
    }
    cancel.cancel();
    drop(dropped);
    let rest: Vec<_> = cancelled.by_ref().collect();
    assert!(matches!(rest.last(), Some(Err(CoreError::Cancelled))), "{rest:?}");
    for ((s, e), p) in streams.into_iter().zip(&expected).zip(&prompts) {
        assert_same(&s.complete().unwrap(), e, &format!("{p:?} beside a cancelled row"));
    }
    // A job after the cancel sees both long rows gone.
    model.attention_inspector().unwrap().inspect_attention("x", CancelToken::new()).unwrap();
    let load = model.engine_load().unwrap();
    assert_eq!((load.running, load.batch_size), (0, 0), "{load:?}");
    assert!(model.metrics().generated_tokens < 10_000);
}

#[test]
fn a_refused_request_leaves_the_running_ones_alone() {
    let model = load(&common::tiny_model("gemma3-tiny"));
    let (prompts, settings) = (prompts(), settings());
    let expected = alone(model.as_ref(), &prompts[..3], &settings[..3]);
    let mut streams: Vec<TokenStream> = prompts[..3]
        .iter()
        .zip(&settings[..3])
        .map(|(p, s)| model.generate(p, s, CancelToken::new()).unwrap())
        .collect();
    let first = streams[0].next().unwrap().unwrap();
    // Longer than the context (128 tokens), and a bad setting: refused, each with its reason.
    let e = model.generate(&"word ".repeat(400), &settings[0], CancelToken::new()).unwrap_err();
    assert!(e.to_string().contains("context length"), "{e}");
    let e = model.generate("hello", &settings[0].clone().temperature(-1.0), CancelToken::new()).unwrap_err();
    assert!(e.to_string().contains("temperature"), "{e}");
    let mut got = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut tokens: Vec<_> = Vec::new();
        if i == 0 {
            tokens.push(first.clone());
        }
        tokens.extend(s.by_ref().map(|t| t.unwrap()));
        let text = tokens.iter().map(|t| t.text.as_str()).collect();
        got.push(Completion { tokens, text, metrics: None });
    }
    for ((g, e), p) in got.iter().zip(&expected).zip(&prompts) {
        assert_same(g, e, &format!("{p:?} beside refused requests"));
    }
}

#[test]
fn max_batch_and_prefill_step_come_from_the_load_settings() {
    let path = common::tiny_model("llama3-tiny");
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let with = |key: &str, value: &str| {
        let settings = LoadSettings::default().backend("metal").device(inference_core::Device::Cpu);
        reg.load_model(&path, &settings.backend_option(key, value))
    };
    for (key, value) in [("max_batch", "0"), ("max_batch", "many"), ("prefill_step", "-3")] {
        let e = with(key, value).err().unwrap_or_else(|| panic!("{key} = {value} was accepted"));
        let report = e.report().to_string();
        assert!(report.contains(key) && report.contains("at least 1"), "{report}");
    }
    // Two rows at most, and prompts going in three tokens per step: four callers still each get
    // what they get alone, two at a time.
    let model: Arc<dyn TextModel> = Arc::from(with("max_batch", "2").unwrap());
    assert_eq!(model.engine_load().unwrap().max_batch, 2);
    let (prompts, settings) = (prompts(), settings());
    let expected = alone(model.as_ref(), &prompts[..4], &settings[..4]);
    // Beside a row that runs all along, each request gets the second place in turn.
    let anchor = anchor(model.as_ref());
    let got = staggered(model.as_ref(), &prompts[..4], &settings[..4]);
    drop(anchor);
    for ((g, e), p) in got.iter().zip(&expected).zip(&prompts) {
        assert_same(g, e, &format!("{p:?} with max_batch 2"));
    }
    assert_eq!(model.engine_load().unwrap().peak_batch_size, 2);
    let chunked: Arc<dyn TextModel> = Arc::from(with("prefill_step", "3").unwrap());
    let got = staggered(chunked.as_ref(), &prompts[..4], &settings[..4]);
    let expected = alone(chunked.as_ref(), &prompts[..4], &settings[..4]);
    for ((g, e), p) in got.iter().zip(&expected).zip(&prompts) {
        assert_same(g, e, &format!("{p:?} prefilled three tokens a step"));
    }
}

/// Two turns of a session, the second starting before the first is read: their texts.
fn two_turns(model: &dyn TextModel, first: &str, second: &str, s: &GenerateSettings) -> (String, String, usize) {
    let mut session = model.new_session().unwrap();
    let a = session.generate(first, s, CancelToken::new()).unwrap();
    // Jobs on a session wait for its running turn: this answer counts the whole first turn.
    let cached = session.cached_tokens().unwrap();
    let b = session.generate(&format!("{first}{second}"), s, CancelToken::new()).unwrap();
    (a.complete().unwrap().text, b.complete().unwrap().text, cached)
}

#[test]
fn session_turns_join_the_batch_and_equal_each_alone() {
    for name in ["gemma3-tiny", "qwen3-tiny"] {
        let model = load(&common::tiny_model(name));
        let s = GenerateSettings::default().max_tokens(12).ignore_eos(true);
        let (first, second) = ("once upon a time there was a river ".repeat(3), " and then".to_owned());
        let by_itself = two_turns(model.as_ref(), &first, &second, &s);
        assert!(by_itself.2 > 0, "{name}: the first turn left nothing cached");
        // Now with other generations decoding all along.
        let (prompts, settings) = (prompts(), settings());
        let expected = alone(model.as_ref(), &prompts[..3], &settings[..3]);
        let anchor = anchor(model.as_ref());
        let others: Vec<TokenStream> = prompts[..3]
            .iter()
            .zip(&settings[..3])
            .map(|(p, s)| model.generate(p, s, CancelToken::new()).unwrap())
            .collect();
        let batched = two_turns(model.as_ref(), &first, &second, &s);
        assert_eq!(batched, by_itself, "{name}: session turns beside other rows");
        for ((o, e), p) in others.into_iter().zip(&expected).zip(&prompts) {
            assert_same(&o.complete().unwrap(), e, &format!("{name}: {p:?} beside session turns"));
        }
        drop(anchor);
        assert!(model.engine_load().unwrap().peak_batch_size >= 2);
    }
}

#[test]
fn admission_keeps_the_kv_cache_within_its_budget() {
    let path = common::tiny_model("llama3-tiny");
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let with_budget = |bytes: Option<usize>| -> Arc<dyn TextModel> {
        let mut settings = LoadSettings::default().backend("metal").device(inference_core::Device::Cpu);
        if let Some(b) = bytes {
            settings = settings.backend_option("kv_cache_bytes", b.to_string());
        }
        Arc::from(reg.load_model(&path, &settings).unwrap())
    };
    let free = with_budget(None);
    let per_token = free.engine_load().unwrap().kv_bytes_per_token;
    assert!(per_token > 0, "{:?}", free.engine_load());
    let (prompt, s) = ("one two three four five six", GenerateSettings::default().max_tokens(8).ignore_eos(true));
    let alone = free.generate(prompt, &s, CancelToken::new()).unwrap().complete().unwrap();
    let footprint = alone.metrics.unwrap().prompt_tokens + 8;
    // Room for two such generations at once, not three.
    let model = with_budget(Some(2 * footprint * per_token));
    let load = model.engine_load().unwrap();
    assert_eq!((load.kv_budget_bytes, load.kv_bytes_per_token), (2 * footprint * per_token, per_token));
    let streams: Vec<TokenStream> = (0..4).map(|_| model.generate(prompt, &s, CancelToken::new()).unwrap()).collect();
    for stream in streams {
        assert_same(&stream.complete().unwrap(), &alone, "a generation admitted within the KV budget");
    }
    let peak = model.engine_load().unwrap().peak_batch_size;
    assert!((1..=2).contains(&peak), "the budget holds two rows, not {peak}");
    // One that could never fit, even alone, is refused with the figures.
    let e = model
        .generate(prompt, &s.clone().max_tokens(footprint * 2), CancelToken::new())
        .and_then(|s| s.complete())
        .unwrap_err();
    assert!(e.to_string().contains("kv_cache_bytes") && e.to_string().contains("max_tokens"), "{e}");
    let e = reg
        .load_model(&path, &LoadSettings::default().backend("metal").backend_option("kv_cache_bytes", "none"))
        .err()
        .expect("a bad budget is refused");
    assert!(e.report().to_string().contains("kv_cache_bytes"), "{}", e.report());
}
