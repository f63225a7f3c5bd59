// SPDX-License-Identifier: EUPL-1.2
//! Chat sessions: a turn prefills only what is new and continues exactly as
//! a fresh run over the whole conversation; divergent histories, sliding
//! windows, saving and loading, and bad session files.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::path::Path;

use inference_core::{
    CancelToken, ChatSession, Error as CoreError, GenerateSettings, LoadSettings, Message, Registry, TextModel,
};

/// Loads a model on the CPU; the tiny fixtures' 128-token context is
/// stretched so three turns of their gibberish fit.
fn load(path: &Path) -> Box<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    reg.load_model(
        path,
        &LoadSettings::default().backend("metal").device(inference_core::Device::Cpu).context_length(1024),
    )
    .unwrap_or_else(|e| panic!("loading {}: {}", path.display(), e.report()))
}

fn settings(n: usize) -> GenerateSettings {
    GenerateSettings::default().max_tokens(n)
}

struct Turn {
    ids: Vec<u32>,
    text: String,
    prompt: usize,
    cached: usize,
}

fn chat_turn(s: &mut dyn ChatSession, messages: &[Message], n: usize) -> Turn {
    let out = s.chat(messages, &settings(n), CancelToken::new()).unwrap().complete().unwrap();
    let m = out.metrics.expect("metrics");
    Turn {
        ids: out.tokens.iter().map(|t| t.id).collect(),
        text: out.text,
        prompt: m.prompt_tokens,
        cached: m.cached_prompt_tokens,
    }
}

fn fresh(model: &dyn TextModel, messages: &[Message], n: usize) -> (Vec<u32>, usize) {
    let out = model.chat(messages, &settings(n), CancelToken::new()).unwrap().complete().unwrap();
    (out.tokens.iter().map(|t| t.id).collect(), out.metrics.unwrap().prompt_tokens)
}

/// Three turns; each reply equals a fresh run over the whole conversation,
/// and turns after the first take most of their prompt from the cache.
fn conversation(model: &dyn TextModel, what: &str, expect_reuse: bool) {
    let mut session = model.new_session().unwrap();
    let mut messages = vec![Message::system("You are terse."), Message::user("Name a colour.")];
    let questions = ["Name another one.", "And a third, please, in French?"];
    let mut previous_total = 0;
    for turn in 0..=questions.len() {
        let got = chat_turn(session.as_mut(), &messages, 10);
        let (want, prompt) = fresh(model, &messages, 10);
        assert_eq!(got.ids, want, "{what}: turn {turn}");
        assert_eq!(got.prompt, prompt, "{what}: turn {turn}");
        if turn == 0 {
            assert_eq!(got.cached, 0);
        } else if expect_reuse {
            assert!(
                got.cached > 0 && got.cached <= previous_total && got.cached < got.prompt,
                "{what}: turn {turn}: {} of {} cached after {previous_total}",
                got.cached,
                got.prompt
            );
        }
        assert!(session.cached_tokens().unwrap() >= got.prompt, "{what}: the cache holds the prompt");
        previous_total = session.cached_tokens().unwrap();
        messages.push(Message::assistant(got.text));
        if let Some(q) = questions.get(turn) {
            messages.push(Message::user(*q));
        }
    }
}

#[test]
fn turns_continue_exactly_like_a_fresh_run_on_the_fixtures() {
    // qwen3 and llama3: standard caches; gemma3-tiny: 8-token sliding windows
    // that wrap, so divergences start again (still exact).
    conversation(load(&common::tiny_model("qwen3-tiny")).as_ref(), "qwen3-tiny", true);
    conversation(load(&common::tiny_model("llama3-tiny")).as_ref(), "llama3-tiny", true);
    conversation(load(&common::tiny_model("gemma3-tiny")).as_ref(), "gemma3-tiny", false);
}

#[test]
fn turns_continue_exactly_like_a_fresh_run_on_real_models() {
    // Gemma 3 270M has 512-token sliding windows (rotating caches) that this
    // conversation stays inside, so they are trimmed and reused too.
    for name in ["smollm2-135m-instruct", "gemma3-270m"] {
        let Some(dir) = common::real_model(name) else { continue };
        conversation(load(&dir).as_ref(), name, true);
    }
}

#[test]
fn raw_continuations_prefill_only_the_new_text() {
    let model = load(&common::tiny_model("llama-tiny"));
    let mut s = model.new_session().unwrap();
    let first = "one two three four five six seven";
    let a = s.generate(first, &settings(5), CancelToken::new()).unwrap().complete().unwrap();
    let more = format!("{first} eight nine ten");
    let b = s.generate(&more, &settings(5), CancelToken::new()).unwrap().complete().unwrap();
    let alone = model.generate(&more, &settings(5), CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(b.text, alone.text);
    let m = b.metrics.unwrap();
    // Everything the two prompts share (the first prompt, but for a last
    // token that may merge with the new text) comes from the cache.
    let tok = mlx_metal::tokenizer::Tokenizer::from_dir(common::tiny_model("llama-tiny")).unwrap();
    let (x, y) = (tok.encode_prompt(first).unwrap(), tok.encode_prompt(&more).unwrap());
    let shared = x.iter().zip(&y).take_while(|(p, q)| p == q).count();
    assert_eq!(a.metrics.unwrap().prompt_tokens, x.len());
    assert!(shared + 1 >= x.len(), "the tokenisations share {shared} of {} tokens", x.len());
    assert_eq!(m.cached_prompt_tokens, shared, "{m:?}");
    // The same prompt again: everything but the last token comes from the cache.
    let c = s.generate(&more, &settings(5), CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(c.text, alone.text);
    assert_eq!(c.metrics.unwrap().cached_prompt_tokens, m.prompt_tokens - 1);
}

#[test]
fn a_divergent_history_trims_to_the_common_prefix() {
    let model = load(&common::tiny_model("qwen3-tiny"));
    let mut s = model.new_session().unwrap();
    let base = vec![Message::system("Be brief."), Message::user("Tell me about cats and their whiskers.")];
    chat_turn(s.as_mut(), &base, 6);
    let edited = vec![Message::system("Be brief."), Message::user("Tell me about dogs.")];
    let got = chat_turn(s.as_mut(), &edited, 6);
    let (want, prompt) = fresh(model.as_ref(), &edited, 6);
    assert_eq!(got.ids, want);
    assert!(got.cached > 0 && got.cached < prompt, "kept the shared system prompt only: {}", got.cached);
    // A new system prompt shares nothing after the first tokens.
    s.reset().unwrap();
    assert_eq!(s.cached_tokens().unwrap(), 0);
    let got = chat_turn(s.as_mut(), &edited, 6);
    assert_eq!(got.cached, 0);
    assert_eq!(got.ids, want);
}

#[test]
fn a_saved_session_continues_identically_after_loading() {
    for name in ["qwen3-tiny", "gemma3-tiny"] {
        let model = load(&common::tiny_model(name));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("chat.safetensors");
        let mut s = model.new_session().unwrap();
        let mut messages = vec![Message::user("Say something about rivers and the rain.")];
        let first = chat_turn(s.as_mut(), &messages, 8);
        s.save(&file).unwrap();
        messages.push(Message::assistant(first.text));
        messages.push(Message::user("More."));
        let mut loaded = model.new_session().unwrap();
        loaded.load(&file).unwrap();
        assert_eq!(loaded.cached_tokens().unwrap(), s.cached_tokens().unwrap());
        let a = chat_turn(s.as_mut(), &messages, 8);
        let b = chat_turn(loaded.as_mut(), &messages, 8);
        assert_eq!(a.ids, b.ids, "{name}");
        assert_eq!(a.cached, b.cached, "{name}");
        let (want, _) = fresh(model.as_ref(), &messages, 8);
        assert_eq!(b.ids, want, "{name}");
    }
}

#[test]
fn bad_session_files_are_refused_and_leave_the_session_alone() {
    let qwen = load(&common::tiny_model("qwen3-tiny"));
    let llama = load(&common::tiny_model("llama-tiny"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("qwen.safetensors");
    let mut s = qwen.new_session().unwrap();
    chat_turn(s.as_mut(), &[Message::user("hello there")], 3);
    s.save(&file).unwrap();

    let mut other = llama.new_session().unwrap();
    chat_turn(other.as_mut(), &[Message::user("hi")], 3);
    let before = other.cached_tokens().unwrap();
    let e = other.load(&file).unwrap_err();
    assert!(matches!(e, CoreError::InvalidModel { .. }), "{e}");
    assert!(e.to_string().contains("another model"), "{e}");
    assert_eq!(other.cached_tokens().unwrap(), before, "a failed load changes nothing");

    // Not a session: a model's weights.
    let weights = common::tiny_model("llama-tiny").join("model.safetensors");
    let e = other.load(&weights).unwrap_err();
    assert!(e.to_string().contains("not a session file"), "{e}");
    // Missing and truncated files.
    let e = other.load(&dir.path().join("missing.safetensors")).unwrap_err();
    assert!(matches!(e, CoreError::Io { .. }), "{e}");
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let mut again = qwen.new_session().unwrap();
    let e = again.load(&cut).unwrap_err();
    assert!(matches!(e, CoreError::InvalidModel { .. }), "{e}");
    // Empty prompts and closed models.
    assert!(matches!(s.chat(&[], &settings(3), CancelToken::new()).unwrap_err(), CoreError::EmptyPrompt));
    assert!(matches!(s.generate("", &settings(3), CancelToken::new()).unwrap_err(), CoreError::EmptyPrompt));
    qwen.close().unwrap();
    let e = s.chat(&[Message::user("x")], &settings(3), CancelToken::new()).unwrap_err();
    assert!(matches!(e, CoreError::Closed), "{e}");
}

#[test]
fn session_files_whose_keys_and_values_do_not_fit_the_model_are_refused_at_load() {
    use mlx::{Dtype, ops};
    let model = load(&common::tiny_model("qwen3-tiny"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("good.safetensors");
    let mut s = model.new_session().unwrap();
    chat_turn(s.as_mut(), &[Message::user("hello there")], 3);
    s.save(&file).unwrap();
    let saved = mlx::io::load_safetensors(&file).unwrap();
    let keys = saved.tensors["layers.0.keys"].clone();
    let [b, h, l, d] = keys.shape()[..] else { panic!("keys are [B, H, L, D]: {:?}", keys.shape()) };
    let nan = ops::full(&[b, h, l, d], &mlx::Array::scalar(f32::NAN), keys.dtype()).unwrap();
    let tampered: [(&str, mlx::Array, &str); 4] = [
        ("heads", ops::zeros(&[b, h + 1, l, d], keys.dtype()).unwrap(), "do not fit this model's"),
        ("head size", ops::zeros(&[b, h, l, d * 2], keys.dtype()).unwrap(), "do not fit this model's"),
        ("int32", ops::zeros(&[b, h, l, d], Dtype::Int32).unwrap(), "are Int32; this model's cache holds"),
        ("NaN", nan, "hold NaN or infinite values"),
    ];
    for (what, bad_keys, expected) in tampered {
        let mut tensors = saved.tensors.clone();
        tensors.insert("layers.0.keys".to_owned(), bad_keys);
        let path = dir.path().join(format!("{what}.safetensors"));
        mlx::io::save_safetensors(&path, tensors.iter().map(|(k, a)| (k.as_str(), a)), &saved.metadata).unwrap();
        let mut fresh = model.new_session().unwrap();
        let e = fresh.load(&path).unwrap_err();
        assert!(matches!(e, CoreError::InvalidModel { .. }), "{what}: {e}");
        assert!(e.to_string().contains("layer 0: keys") && e.to_string().contains(expected), "{what}: {e}");
        assert_eq!(fresh.cached_tokens().unwrap(), 0, "{what}: a refused file changes nothing");
    }
    // The untouched file still loads and continues.
    let mut fresh = model.new_session().unwrap();
    fresh.load(&file).unwrap();
    assert!(fresh.cached_tokens().unwrap() > 0);
}

#[test]
fn a_cancelled_turn_leaves_a_usable_session() {
    let model = load(&common::tiny_model("qwen3-tiny"));
    let mut s = model.new_session().unwrap();
    let messages = vec![Message::user("Count to a thousand.")];
    let cancel = CancelToken::new();
    let mut stream = s.chat(&messages, &settings(200).ignore_eos(true), cancel.clone()).unwrap();
    let _ = stream.next();
    cancel.cancel();
    let _ = stream.complete();
    let got = chat_turn(s.as_mut(), &messages, 6);
    let (want, _) = fresh(model.as_ref(), &messages, 6);
    assert_eq!(got.ids, want);
}

/// The session cache itself: a wrapped sliding-window cache, saved and
/// loaded, continues exactly like the original and like a fresh run.
#[test]
fn a_wrapped_sliding_window_cache_survives_saving() {
    use std::ops::ControlFlow;

    use mlx::device::{Device, DeviceScope};
    use mlx_metal::generate::{self, LoopOptions};
    use mlx_metal::sample::{Sampler, SamplerConfig};
    use mlx_metal::session::{Fingerprint, SessionCache};

    let _cpu = DeviceScope::new(Device::Cpu).unwrap();
    let loaded = mlx_metal::model::load(&common::tiny_model("gemma3-tiny")).unwrap();
    let model = loaded.model.as_ref();
    let fp = Fingerprint::new(model.description(), b"{}");
    let sampler = Sampler::new(SamplerConfig::default()).unwrap();
    let run = |cache: &mut SessionCache, ids: &[u32]| -> (Vec<u32>, usize) {
        let cached = cache.prepare(model, ids).unwrap();
        let opts = LoopOptions { max_tokens: 6, ..LoopOptions::default() };
        let mut out = Vec::new();
        let stats = generate::generate(model, cache.caches_mut(), &ids[cached..], &sampler, &opts, &|| false, |s| {
            out.push(s.id);
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        cache.record(model, ids, &stats.fed).unwrap();
        (out, cached)
    };
    // 20 prompt tokens: the 8-token windows wrap.
    let first: Vec<u32> = (1..=20).map(|i| i * 7 % 300).collect();
    let mut original = SessionCache::new(model).unwrap();
    run(&mut original, &first);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    original.save(&file, &fp).unwrap();
    let mut restored = SessionCache::load(&file, model, &fp).unwrap();
    assert_eq!(restored.tokens(), original.tokens());
    // Extend exactly what the caches hold: nothing to trim, all reused.
    let mut next = original.tokens().to_vec();
    next.extend([11, 12, 13]);
    let (a, cached_a) = run(&mut original, &next);
    let (b, cached_b) = run(&mut restored, &next);
    assert_eq!(cached_a, next.len() - 3);
    assert_eq!(cached_b, cached_a);
    assert_eq!(a, b);
    let (c, _) = run(&mut SessionCache::new(model).unwrap(), &next);
    assert_eq!(a, c, "reusing the wrapped cache equals a fresh run");
    // Another model's fingerprint is refused.
    let other = Fingerprint { num_layers: 99, ..fp.clone() };
    let e = SessionCache::load(&file, model, &other).err().unwrap();
    assert!(e.to_string().contains("another model"), "{e}");
}
