// SPDX-License-Identifier: EUPL-1.2
//! The tests that hold a fake backend (`fake/mod.rs`) to the contract: streaming, cancellation,
//! dropped streams, errors after tokens, metrics, capabilities and sharing across threads.

mod common;
mod fake;

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use fake::{Ending, FakeBackend, FakeModel, VOCAB, ending, fake_model};
use inference_core::{
    CancelToken, Error, GenerateMetrics, GenerateSettings, LoadSettings, LogitsMode, LoraConfig, Message, Registry,
    TextModel, Token, TokenStream,
};

fn texts(tokens: &[Token]) -> Vec<&str> {
    tokens.iter().map(|t| t.text.as_str()).collect()
}

/// A fake model, the channel its producers report their endings on, and a
/// stream of "forever" (a prompt the fake never finishes) under `cancel`.
fn streaming_forever(cancel: CancelToken) -> (FakeModel, Receiver<Ending>, TokenStream) {
    let (model, endings) = fake_model();
    let stream = model.generate("forever", &GenerateSettings::new(), cancel).unwrap();
    (model, endings, stream)
}

/// The fake model as callers hold it: behind the `TextModel` trait.
fn fake_text_model() -> Box<dyn TextModel> {
    let (model, _endings) = fake_model();
    Box::new(model)
}

// ---- streaming ----

#[test]
fn streams_tokens_in_order_then_reports_metrics() {
    let (model, endings) = fake_model();
    let settings = GenerateSettings::new().max_tokens(3);
    let mut stream = model.generate("the quick brown fox", &settings, CancelToken::new()).unwrap();
    let mut tokens = Vec::new();
    for token in &mut stream {
        tokens.push(token.unwrap());
    }
    assert_eq!(texts(&tokens), ["the", "quick", "brown"]);
    assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(tokens.iter().all(|t| t.logprob.is_none() && t.logits.is_none()));
    assert!(stream.is_finished());
    let metrics = *stream.metrics().expect("metrics after a normal end");
    assert_eq!(metrics.prompt_tokens, 4);
    assert_eq!(metrics.generated_tokens, 3);
    assert_eq!(metrics.decode_tokens_per_sec, 30.0);
    assert_eq!(model.metrics(), metrics);
    assert_eq!(ending(&endings), Ending::Finished { sent: 3 });
}

#[test]
fn tokens_arrive_before_generation_ends() {
    // "forever" never finishes, so every token read proves streaming.
    let (_model, endings, mut stream) = streaming_forever(CancelToken::new());
    let first: Vec<_> = stream.by_ref().take(5).map(Result::unwrap).collect();
    assert_eq!(texts(&first), ["t0", "t1", "t2", "t3", "t4"]);
    drop(stream);
    assert!(matches!(ending(&endings), Ending::Stopped { sent: 5, .. }));
}

#[test]
fn logits_are_attached_only_on_request() {
    let (model, _endings) = fake_model();
    let settings = GenerateSettings::new().logits(LogitsMode::LogProbs);
    let done = model.generate("a b", &settings, CancelToken::new()).unwrap().complete().unwrap();
    assert_eq!(done.text, "ab");
    for t in &done.tokens {
        assert_eq!(t.logprob, Some(-0.25));
        assert_eq!(t.logits.as_ref().map(Vec::len), Some(VOCAB));
    }
}

// ---- cancellation ----

#[test]
fn cancel_mid_stream_stops_the_producer_within_one_token() {
    let cancel = CancelToken::new();
    let (_model, endings, mut stream) = streaming_forever(cancel.clone());
    for expected in ["t0", "t1", "t2"] {
        assert_eq!(stream.next().unwrap().unwrap().text, expected);
    }
    cancel.cancel();
    assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
    assert!(stream.next().is_none());
    // The producer had handed over exactly three tokens; its next send failed.
    assert_eq!(ending(&endings), Ending::Stopped { sent: 3, cancelled: true });
    // The stream is held, not dropped: cancellation alone released the producer.
    drop(stream);
}

#[test]
fn cancel_from_another_thread_stops_generation() {
    let cancel = CancelToken::new();
    let (_model, endings, mut stream) = streaming_forever(cancel.clone());
    assert!(stream.next().unwrap().is_ok());
    let canceller = cancel.clone();
    thread::spawn(move || canceller.cancel()).join().unwrap();
    assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
    assert_eq!(ending(&endings), Ending::Stopped { sent: 1, cancelled: true });
}

#[test]
fn dropping_the_stream_stops_the_producer() {
    let cancel = CancelToken::new();
    let (model, endings, mut stream) = streaming_forever(cancel.clone());
    assert!(stream.next().unwrap().is_ok());
    assert!(stream.next().unwrap().is_ok());
    drop(stream);
    assert_eq!(ending(&endings), Ending::Stopped { sent: 2, cancelled: true });
    assert!(!cancel.is_cancelled(), "dropping a stream must not cancel the caller's token");
    // The same token still serves the next call.
    let text = model.generate("still here", &GenerateSettings::new(), cancel).unwrap().collect_text().unwrap();
    assert_eq!(text, "stillhere");
}

#[test]
fn passed_deadline_stops_before_the_first_token() {
    let (_model, endings, mut stream) = streaming_forever(CancelToken::with_deadline(Instant::now()));
    assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
    assert_eq!(ending(&endings), Ending::Stopped { sent: 0, cancelled: true });
}

#[test]
fn one_token_cancels_many_calls() {
    let (model, endings) = fake_model();
    let cancel = CancelToken::new();
    let mut a = model.generate("forever", &GenerateSettings::new(), cancel.clone()).unwrap();
    let mut b = model.generate("forever", &GenerateSettings::new(), cancel.clone()).unwrap();
    assert!(a.next().unwrap().is_ok());
    assert!(b.next().unwrap().is_ok());
    cancel.cancel();
    assert!(matches!(a.next(), Some(Err(Error::Cancelled))));
    assert!(matches!(b.next(), Some(Err(Error::Cancelled))));
    for _ in 0..2 {
        assert!(matches!(ending(&endings), Ending::Stopped { sent: 1, cancelled: true }));
    }
}

// ---- errors ----

#[test]
fn error_after_some_tokens_is_the_last_item() {
    let (model, endings) = fake_model();
    let mut stream = model.generate("fail after 2", &GenerateSettings::new(), CancelToken::new()).unwrap();
    assert_eq!(stream.next().unwrap().unwrap().text, "t0");
    assert_eq!(stream.next().unwrap().unwrap().text, "t1");
    let err = stream.next().unwrap().unwrap_err();
    assert_eq!(err.to_string(), "backend \"fake\": device lost");
    assert!(stream.next().is_none());
    assert!(stream.metrics().is_none());
    assert_eq!(ending(&endings), Ending::Failed { sent: 2 });

    let err = model
        .generate("fail after 1", &GenerateSettings::new(), CancelToken::new())
        .unwrap()
        .collect_text()
        .unwrap_err();
    assert!(matches!(err, Error::Backend { .. }));
}

#[test]
fn producer_that_vanishes_is_reported() {
    let (model, endings) = fake_model();
    let mut stream = model.generate("vanish after 1", &GenerateSettings::new(), CancelToken::new()).unwrap();
    assert!(stream.next().unwrap().is_ok());
    assert!(matches!(stream.next(), Some(Err(Error::StreamAborted))));
    assert!(stream.next().is_none());
    assert_eq!(ending(&endings), Ending::Vanished { sent: 1 });
}

#[test]
fn bad_requests_fail_before_streaming() {
    let (model, _endings) = fake_model();
    let bad = GenerateSettings::new().temperature(f32::NAN);
    assert!(matches!(model.generate("hi", &bad, CancelToken::new()), Err(Error::InvalidSetting { .. })));
    assert!(matches!(model.generate("  ", &GenerateSettings::new(), CancelToken::new()), Err(Error::EmptyPrompt)));
    assert!(matches!(model.chat(&[], &GenerateSettings::new(), CancelToken::new()), Err(Error::EmptyPrompt)));
    assert!(matches!(model.classify(&["x"], &bad, CancelToken::new()), Err(Error::InvalidSetting { .. })));
    assert!(matches!(model.batch_generate(&["x"], &bad, CancelToken::new()), Err(Error::InvalidSetting { .. })));
}

// ---- the other operations ----

#[test]
fn chat_answers_the_last_message() {
    let (model, _endings) = fake_model();
    let messages = [Message::system("be brief"), Message::user("hello there")];
    let text = model.chat(&messages, &GenerateSettings::new(), CancelToken::new()).unwrap().collect_text().unwrap();
    assert_eq!(text, "hellothere");
}

#[test]
fn classify_returns_one_result_per_prompt() {
    let (model, _endings) = fake_model();
    let results = model.classify(&["yes it is", "no"], &GenerateSettings::new(), CancelToken::new()).unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].token, Token::new(1, "yes"));
    assert_eq!(results[1].token, Token::new(2, "no"));
    assert!(results.iter().all(|r| r.logits.is_none()));

    let with_logits = GenerateSettings::new().logits(LogitsMode::Logits);
    let results = model.classify(&["a"], &with_logits, CancelToken::new()).unwrap();
    assert_eq!(results[0].logits.as_ref().map(Vec::len), Some(VOCAB));

    let cancelled = CancelToken::new();
    cancelled.cancel();
    assert!(matches!(model.classify(&["a"], &GenerateSettings::new(), cancelled), Err(Error::Cancelled)));
}

#[test]
fn batch_generate_reports_failures_per_prompt() {
    let (model, _endings) = fake_model();
    let results =
        model.batch_generate(&["a b", "fail after 1", ""], &GenerateSettings::new(), CancelToken::new()).unwrap();
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok());
    assert_eq!(results[0].text(), "ab");
    assert_eq!(results[1].text(), "t0");
    assert!(matches!(results[1].error, Some(Error::Backend { .. })));
    assert!(results[2].tokens.is_empty());
    assert!(matches!(results[2].error, Some(Error::EmptyPrompt)));
}

#[test]
fn info_and_model_type() {
    let (model, _endings) = fake_model();
    assert_eq!(model.model_type(), "fake");
    let info = model.info();
    assert_eq!(info.architecture, "fake");
    assert_eq!((info.vocab_size, info.num_layers, info.hidden_size), (4, 2, 8));
    assert!(info.is_quantised());
    assert_eq!(info.context_length, Some(128));
    assert_eq!(model.metrics(), GenerateMetrics::default());
}

#[test]
fn close_is_idempotent_and_later_calls_fail_with_closed() {
    let (model, _endings) = fake_model();
    model.close().unwrap();
    model.close().unwrap();
    let s = GenerateSettings::new();
    assert!(matches!(model.generate("a", &s, CancelToken::new()), Err(Error::Closed)));
    assert!(matches!(model.chat(&[Message::user("a")], &s, CancelToken::new()), Err(Error::Closed)));
    assert!(matches!(model.classify(&["a"], &s, CancelToken::new()), Err(Error::Closed)));
    assert!(matches!(model.batch_generate(&["a"], &s, CancelToken::new()), Err(Error::Closed)));
    let inspector = model.attention_inspector().unwrap();
    assert!(matches!(inspector.inspect_attention("a", CancelToken::new()), Err(Error::Closed)));
}

// ---- capabilities ----

#[test]
fn attention_inspector_is_discoverable() {
    let model = fake_text_model();
    let inspector = model.attention_inspector().expect("fake can inspect");
    let snap = inspector.inspect_attention("one two three", CancelToken::new()).unwrap();
    assert_eq!((snap.num_layers, snap.num_heads, snap.seq_len), (2, 1, 3));
    assert!(snap.has_queries());
    assert_eq!(snap.key(1, 0).unwrap()[..2], [100.0, 101.0]);
    assert_eq!(snap.query(0, 1).unwrap()[0], -10.0);
    assert_eq!(snap.keys[0][0].len(), snap.seq_len * snap.head_dim);
    assert!(matches!(inspector.inspect_attention("", CancelToken::new()), Err(Error::EmptyPrompt)));
}

#[test]
fn trainer_is_discoverable() {
    let model = fake_text_model();
    let trainer = model.trainer().expect("fake can train");
    assert_eq!(trainer.num_layers(), 2);
    let ids = trainer.encode("hi").unwrap();
    assert_eq!(ids, [104, 105]);
    assert_eq!(trainer.decode(&ids).unwrap(), "hi");
    assert_eq!(
        trainer.decode(&[999]).unwrap_err().to_string(),
        "backend \"fake\": token id 999 is outside the vocabulary"
    );
    let adapter = trainer.apply_lora(&LoraConfig::default()).unwrap();
    assert_eq!(adapter.total_params(), 2 * 2 * 2 * 8 * 8);
    assert!(matches!(trainer.apply_lora(&LoraConfig::default().rank(0)), Err(Error::InvalidSetting { .. })));
    let dir = tempfile::tempdir().unwrap();
    adapter.save(&dir.path().join("adapter")).unwrap();
    let saved: LoraConfig =
        serde_json::from_slice(&std::fs::read(dir.path().join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(saved, LoraConfig::default());
}

#[test]
fn models_without_capabilities_say_so() {
    let model: Box<dyn TextModel> = Box::new(common::MinimalModel { path: "/m".into() });
    assert!(model.attention_inspector().is_none());
    assert!(model.trainer().is_none());
    assert_eq!(
        model.classify(&["x"], &GenerateSettings::new(), CancelToken::new()).unwrap_err().to_string(),
        "backend \"minimal\" does not support classification"
    );
}

// ---- through the registry, shared across threads ----

#[test]
fn loaded_through_a_registry_and_shared_across_threads() {
    let backend = Arc::new(FakeBackend { endings: Mutex::new(Vec::new()) });
    let registry = Registry::new().with(backend.clone());
    let model: Arc<dyn TextModel> =
        registry.load_model("/models/fake", &LoadSettings::new().backend("fake")).unwrap().into();

    let handles: Vec<_> = (0..4)
        .map(|i| {
            let model = Arc::clone(&model);
            thread::spawn(move || {
                let prompt = format!("thread {i} says hi");
                model
                    .generate(&prompt, &GenerateSettings::new(), CancelToken::new())
                    .and_then(TokenStream::collect_text)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap().unwrap(), format!("thread{i}sayshi"));
    }
    let endings = backend.endings.lock().unwrap();
    assert_eq!(endings.len(), 1);
    for _ in 0..4 {
        assert_eq!(ending(&endings[0]), Ending::Finished { sent: 4 });
    }

    let err = registry.load_model("", &LoadSettings::new()).err().unwrap();
    assert_eq!(err.report(), "backend \"fake\" failed to load model : invalid model at : empty path");
}
