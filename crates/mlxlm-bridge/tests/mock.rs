// SPDX-License-Identifier: EUPL-1.2
//! The protocol and the crash boundary, against the mock bridge (tests/fixtures/mock_bridge.py),
//! which needs Python 3 but not mlx-lm.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use inference_core::{
    Backend, CancelToken, Error, GenerateSettings, LoadSettings, LogitsMode, Message, TextModel, Token,
};
use mlxlm_bridge::{BridgeModel, MlxLmBackend};

const MOCK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mock_bridge.py");

fn settings() -> LoadSettings {
    // The time limit is a safety net; the mock answers in milliseconds.
    LoadSettings::new().backend_option("bridge_script", MOCK).backend_option("timeout_secs", "60")
}

fn load(path: &str) -> BridgeModel {
    load_with(path, settings())
}

fn load_with(path: &str, settings: LoadSettings) -> BridgeModel {
    MlxLmBackend::new().load(Path::new(path), &settings).unwrap_or_else(|e| panic!("load {path}: {}", e.report()))
}

fn load_err(path: &str, settings: LoadSettings) -> Error {
    match MlxLmBackend::new().load(Path::new(path), &settings) {
        Ok(model) => panic!("load {path} succeeded: {model:?}"),
        Err(err) => err,
    }
}

fn start(model: &dyn TextModel, prompt: &str) -> inference_core::TokenStream {
    model.generate(prompt, &GenerateSettings::new(), CancelToken::new()).unwrap()
}

fn text(model: &dyn TextModel, prompt: &str) -> String {
    start(model, prompt).collect_text().unwrap_or_else(|e| panic!("generate {prompt}: {}", e.report()))
}

fn next_token(stream: &mut inference_core::TokenStream) -> Token {
    stream.next().expect("a token").unwrap_or_else(|e| panic!("stream failed: {}", e.report()))
}

fn last_error(stream: inference_core::TokenStream) -> Error {
    let mut last = None;
    for item in stream {
        if let Err(err) = item {
            last = Some(err);
        }
    }
    last.expect("the stream to end with an error")
}

#[cfg(unix)]
fn process_exists(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Asserts that `err`'s message starts with `prefix`.
#[track_caller]
fn assert_starts_with(err: &Error, prefix: &str) {
    assert!(err.to_string().starts_with(prefix), "{err}");
}

/// Asserts that the bridge process `pid` has gone (where that can be checked).
#[track_caller]
fn assert_exited(pid: u32) {
    #[cfg(unix)]
    assert!(!process_exists(pid), "the bridge process {pid} is still running");
    #[cfg(not(unix))]
    let _ = pid;
}

/// The mock model, and the error that ended its generation of `prompt`.
fn failed_generation(prompt: &str) -> (BridgeModel, Error) {
    let model = load("/models/mock");
    let err = last_error(start(&model, prompt));
    (model, err)
}

/// A copy of the mock under a name that selects a start-up behaviour.
fn renamed_mock(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(MOCK, &path).unwrap();
    path
}

// ---- the shipped bridge's own logic ------------------------------------------------------------

#[test]
fn the_bridge_assembles_token_texts_and_cuts_at_stop_strings() {
    // The bridge imports mlx-lm only inside its handlers, so its text assembly can be checked
    // with any Python 3 (tests/fixtures/assembler_check.py, with a fake tokenizer), on the files
    // as they are shipped.
    let dir = tempfile::tempdir().unwrap();
    for (name, source) in mlxlm_bridge::BRIDGE_FILES {
        std::fs::write(dir.path().join(name), source).unwrap();
    }
    let check = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/assembler_check.py");
    let out = std::process::Command::new(mlxlm_bridge::resolve_python(None))
        .arg(check)
        .arg(dir.path().join("bridge_text.py"))
        .output()
        .expect("run Python");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    assert!(report.contains("assembler checks passed"), "{report}");
}

// ---- registration and loading -------------------------------------------------------------------

#[test]
fn register_is_idempotent_and_names_the_backend() {
    mlxlm_bridge::register();
    mlxlm_bridge::register();
    assert_eq!(inference_core::list().iter().filter(|n| *n == "mlx_lm").count(), 1);
    assert_eq!(inference_core::get("mlx_lm").unwrap().name(), "mlx_lm");
    assert_eq!(mlxlm_bridge::backend().name(), mlxlm_bridge::BACKEND_NAME);
}

#[test]
fn load_reports_model_type_info_and_versions() {
    let model = load("/models/mock");
    assert_eq!(model.model_type(), "mock_model");
    let info = model.info();
    assert_eq!(info.architecture, "mock_model");
    assert_eq!((info.vocab_size, info.num_layers, info.hidden_size), (32000, 24, 2048));
    assert_eq!((info.quant_bits, info.quant_group, info.context_length), (Some(4), Some(64), Some(4096)));
    assert_eq!(model.versions().protocol, mlxlm_bridge::PROTOCOL_VERSION);
    assert_eq!(model.versions().mlx_lm, "mock");
    assert!(model.pid() > 0);
    assert_eq!(model.metrics(), inference_core::GenerateMetrics::default());
    let model = load_with("/models/mock", settings().context_length(128));
    assert_eq!(model.info().context_length, Some(128));
}

#[test]
fn load_failure_carries_the_bridge_message_and_traceback() {
    let err = load_err("/models/FAIL", settings());
    assert_eq!(err.to_string(), "backend \"mlx_lm\": load: cannot open model at /models/FAIL");
    assert!(err.report().contains("Python traceback:\nTraceback (most recent call last):\nOSError: no such model"));
}

#[test]
fn invalid_settings_are_rejected_before_starting_anything() {
    let err = load_err("/m", settings().backend_option("device_id", "3"));
    assert!(matches!(err, Error::InvalidSetting { ref name, .. } if name == "backend_options.device_id"), "{err}");
    let err = load_err("/m", settings().context_length(0));
    assert!(matches!(err, Error::InvalidSetting { ref name, .. } if name == "context_length"), "{err}");
    let model = load("/models/mock");
    let err = model.generate("x", &GenerateSettings::new().temperature(-1.0), CancelToken::new()).unwrap_err();
    assert_eq!(err.to_string(), "invalid setting temperature = -1: must be a finite number >= 0");
    assert!(matches!(model.generate("", &GenerateSettings::new(), CancelToken::new()), Err(Error::EmptyPrompt)));
    assert!(matches!(model.chat(&[], &GenerateSettings::new(), CancelToken::new()), Err(Error::EmptyPrompt)));
}

#[test]
fn missing_interpreter_is_a_clear_error_and_unavailable() {
    let err = load_err("/m", settings().backend_option("python", "/nonexistent/bin/python"));
    assert_starts_with(&err, "backend \"mlx_lm\": cannot start the Python interpreter /nonexistent/bin/python");
    let backend = MlxLmBackend::with_python("/nonexistent/venv");
    assert!(!backend.available());
    let reason = backend.unavailable_reason().unwrap();
    assert!(reason.starts_with("cannot run the Python interpreter /nonexistent/venv"), "{reason}");
}

#[test]
fn start_up_failures_end_in_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let script = |name: &str| renamed_mock(dir.path(), name).to_str().unwrap().to_owned();

    let err = load_err("/m", settings().backend_option("bridge_script", script("mock_protocol2.py")));
    assert_starts_with(
        &err,
        "backend \"mlx_lm\": the bridge speaks protocol 2; this crate speaks 1 during start-up; the bridge process was \
         stopped; stderr: mock bridge starting",
    );

    let err = load_err("/m", settings().backend_option("bridge_script", script("mock_importfail.py")));
    assert_eq!(
        err.to_string(),
        "backend \"mlx_lm\": cannot import mlx_lm: ModuleNotFoundError: No module named 'mlx_lm'"
    );
    assert!(err.report().contains("Python traceback:"));

    let err = load_err("/m", settings().backend_option("bridge_script", script("mock_noready.py")));
    assert_eq!(
        err.to_string(),
        "backend \"mlx_lm\": the bridge process exited (exit status: 3) during start-up; stderr: mock bridge starting\n\
         mock: dying at start-up"
    );

    let silent =
        settings().backend_option("bridge_script", script("mock_silent.py")).backend_option("timeout_secs", "1");
    let err = load_err("/m", silent);
    assert_starts_with(&err, "backend \"mlx_lm\": the bridge did not say ready within 1 s during start-up");
}

#[test]
fn hung_load_times_out_and_kills_the_bridge() {
    let err = load_err("/models/HANG", settings().backend_option("timeout_secs", "3"));
    assert_eq!(
        err.to_string(),
        "backend \"mlx_lm\": the bridge did not answer within 3 s during load; the bridge process was stopped; stderr: \
         mock bridge starting"
    );
}

// ---- generation ---------------------------------------------------------------------------------

#[test]
fn generate_streams_tokens_with_metrics() {
    let model = load("/models/mock");
    let done = start(&model, "Hi").complete().unwrap();
    assert_eq!(done.text, "Hello world!\n");
    assert_eq!(done.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), [100, 101, 102, 103, 104]);
    assert!(done.tokens.iter().all(|t| t.logprob.is_none() && t.logits.is_none()));
    let metrics = done.metrics.unwrap();
    assert_eq!((metrics.prompt_tokens, metrics.generated_tokens), (3, 5));
    assert_eq!(metrics.prefill_duration, std::time::Duration::from_millis(250));
    assert_eq!((metrics.prefill_tokens_per_sec, metrics.decode_tokens_per_sec), (12.0, 10.0));
    assert_eq!((metrics.peak_memory_bytes, metrics.active_memory_bytes), (1000, 500));
    assert_eq!(model.metrics(), metrics);
}

#[test]
fn max_tokens_is_honoured() {
    let model = load("/models/mock");
    let out = model.generate("Hi", &GenerateSettings::new().max_tokens(3), CancelToken::new()).unwrap();
    assert_eq!(out.collect_text().unwrap(), "Hello world");
}

#[test]
fn settings_reach_the_bridge() {
    let model = load("/models/mock");
    let s = GenerateSettings::new()
        .max_tokens(9)
        .temperature(0.5)
        .top_k(4)
        .top_p(0.75)
        .min_p(0.125)
        .repetition_penalty(1.25)
        .repetition_context_size(8)
        .stop_tokens([5, 6])
        .stop_strings(["END"])
        .seed(42)
        .logits(LogitsMode::LogProbs)
        .ignore_eos(true);
    let echoed = model.generate("ECHO", &s, CancelToken::new()).unwrap().collect_text().unwrap();
    let v: serde_json::Value = serde_json::from_str(&echoed).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"max_tokens": 9, "temperature": 0.5, "top_k": 4, "top_p": 0.75, "min_p": 0.125,
            "repetition_penalty": 1.25, "repetition_context_size": 8, "stop_tokens": [5, 6], "stop_strings": ["END"],
            "seed": 42, "logits": "logprobs", "ignore_eos": true})
    );
    let messages = [Message::system("be brief"), Message::user("ECHO"), Message::new("tool", "42")];
    let echoed = model.chat(&messages, &GenerateSettings::new(), CancelToken::new()).unwrap().collect_text().unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&echoed).unwrap(),
        serde_json::json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "ECHO"},
            {"role": "tool", "content": "42"}])
    );
}

#[test]
fn tokens_carry_logprobs_and_logits_when_asked() {
    let model = load("/models/mock");
    let s = GenerateSettings::new().max_tokens(1).logits(LogitsMode::Logits);
    let token = model.generate("Hi", &s, CancelToken::new()).unwrap().complete().unwrap().tokens.remove(0);
    assert_eq!(token.logprob, Some(-0.5));
    assert_eq!(token.logits, Some(vec![0.5, f32::NEG_INFINITY, 1.0]));
}

#[test]
fn chat_streams_the_reply() {
    let model = load("/models/mock");
    let out = model.chat(&[Message::user("hello")], &GenerateSettings::new(), CancelToken::new()).unwrap();
    let done = out.complete().unwrap();
    assert_eq!(done.text, "I heard you");
    assert_eq!(done.tokens[0].id, 200);
}

#[test]
fn bridge_errors_end_the_stream_and_leave_the_model_usable() {
    let model = load("/models/mock");
    let err = start(&model, "ERROR please").collect_text().unwrap_err();
    assert_eq!(err.to_string(), "backend \"mlx_lm\": generate: simulated model error");
    assert!(err.report().ends_with("Python traceback:\nTraceback (mock)\nRuntimeError: boom"));

    let items: Vec<_> = start(&model, "ERRORMID").collect();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].as_ref().unwrap().text, "a");
    assert_eq!(items[1].as_ref().unwrap().text, "b");
    assert_eq!(
        items[2].as_ref().unwrap_err().to_string(),
        "backend \"mlx_lm\": generate: simulated failure mid-stream"
    );
    assert_eq!(text(&model, "Hi"), "Hello world!\n");
}

#[test]
fn cancel_takes_effect_mid_stream() {
    let model = load("/models/mock");
    let cancel = CancelToken::new();
    let mut stream = model.generate("ENDLESS", &GenerateSettings::new(), cancel.clone()).unwrap();
    for _ in 0..3 {
        assert_eq!(next_token(&mut stream).text, "tick");
    }
    cancel.cancel();
    assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
    assert!(stream.next().is_none());
    // The endless stream ended in the bridge, or the model would still be busy with it (and,
    // after the time limit, dead).
    assert_eq!(text(&model, "Hi"), "Hello world!\n");
}

#[test]
fn a_consumer_that_stops_early_stops_the_generation() {
    let model = load("/models/mock");
    let mut stream = start(&model, "ENDLESS");
    next_token(&mut stream);
    next_token(&mut stream);
    drop(stream);
    assert_eq!(text(&model, "Hi"), "Hello world!\n");
    // The same through the chat path, stopping after one token.
    let mut stream = model.chat(&[Message::user("ENDLESS")], &GenerateSettings::new(), CancelToken::new()).unwrap();
    next_token(&mut stream);
    drop(stream);
    assert_eq!(text(&model, "Hi"), "Hello world!\n");
}

#[test]
fn concurrent_calls_on_one_model_are_serialised() {
    let model: Arc<dyn TextModel> = Arc::new(load("/models/mock"));
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let model = Arc::clone(&model);
            thread::spawn(move || {
                for _ in 0..5 {
                    if i % 2 == 0 {
                        assert_eq!(text(&*model, "Hi"), "Hello world!\n");
                    } else {
                        let out = model.chat(&[Message::user("x")], &GenerateSettings::new(), CancelToken::new());
                        assert_eq!(out.unwrap().collect_text().unwrap(), "I heard you");
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Two streams opened by one thread run one after the other.
    let first = start(&*model, "Hi");
    let second = start(&*model, "Hi");
    assert_eq!(second.collect_text().unwrap(), "Hello world!\n");
    assert_eq!(first.collect_text().unwrap(), "Hello world!\n");
}

#[test]
fn a_call_waiting_for_a_busy_model_can_be_cancelled() {
    let model = load("/models/mock");
    let mut busy = start(&model, "ENDLESS");
    next_token(&mut busy);
    let cancel = CancelToken::new();
    let mut waiting = model.generate("Hi", &GenerateSettings::new(), cancel.clone()).unwrap();
    cancel.cancel();
    assert!(matches!(waiting.next(), Some(Err(Error::Cancelled))));
    let err = model.classify(&["a"], &GenerateSettings::new(), CancelToken::with_timeout(std::time::Duration::ZERO));
    assert!(matches!(err, Err(Error::Cancelled)));
    drop(busy);
    assert_eq!(text(&model, "Hi"), "Hello world!\n");
}

// ---- the crash boundary -------------------------------------------------------------------------

#[test]
fn a_crash_mid_stream_reports_the_exit_status_and_stderr() {
    let model = load("/models/mock");
    let mut stream = start(&model, "CRASH");
    assert_eq!(next_token(&mut stream).text, "a");
    assert_eq!(next_token(&mut stream).text, "b");
    let err = stream.next().unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        "backend \"mlx_lm\": the bridge process exited (exit status: 3) during generate; stderr: mock bridge \
         starting\nmock: simulated crash"
    );
    assert!(stream.next().is_none());
    let err = start(&model, "Hi").collect_text().unwrap_err();
    assert_starts_with(
        &err,
        "backend \"mlx_lm\": the bridge process is no longer usable: the bridge process exited (exit status: 3)",
    );
    assert!(model.stderr_tail().ends_with("mock: simulated crash"));
    assert!(model.close().is_ok());
}

#[test]
fn a_malformed_line_is_a_clean_error() {
    let (model, err) = failed_generation("MALFORMED");
    assert_starts_with(
        &err,
        "backend \"mlx_lm\": the bridge sent a malformed line (expected ident at line 1 column 2): this is not json during generate; the bridge process was stopped",
    );
    assert!(start(&model, "Hi").collect_text().unwrap_err().to_string().contains("no longer usable"));
}

#[test]
fn an_oversized_line_is_a_clean_error() {
    let (_model, err) = failed_generation("OVERSIZED");
    assert_starts_with(
        &err,
        "backend \"mlx_lm\": bridge line exceeds 16777216 bytes during generate; the bridge process was stopped",
    );
}

#[test]
fn a_reply_to_another_request_is_a_protocol_error() {
    let (_model, err) = failed_generation("WRONGID");
    assert!(
        err.to_string().contains("the bridge sent a token event for request 1003 while request 3 was pending"),
        "{err}"
    );
}

#[test]
fn a_bridge_that_hangs_after_cancel_is_killed() {
    let model = load_with("/models/mock", settings().backend_option("timeout_secs", "2"));
    let pid = model.pid();
    let cancel = CancelToken::new();
    let mut stream = model.generate("HANGGEN", &GenerateSettings::new(), cancel.clone()).unwrap();
    next_token(&mut stream);
    cancel.cancel();
    assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
    // The stream's thread waits for the bridge to end the request, then kills it; the next call
    // waits its turn and learns why the model is gone.
    let err = start(&model, "Hi").collect_text().unwrap_err();
    assert_eq!(
        err.to_string(),
        "backend \"mlx_lm\": the bridge process is no longer usable: the bridge did not end a cancelled generate within \
         2 s and was stopped"
    );
    assert_exited(pid);
}

// ---- close and drop -----------------------------------------------------------------------------

#[test]
fn close_is_explicit_idempotent_and_final() {
    let model = load("/models/mock");
    assert_eq!(text(&model, "Hi"), "Hello world!\n");
    model.close().unwrap_or_else(|e| panic!("close: {}", e.report()));
    model.close().unwrap();
    assert!(matches!(model.generate("Hi", &GenerateSettings::new(), CancelToken::new()), Err(Error::Closed)));
    assert!(matches!(model.classify(&["a"], &GenerateSettings::new(), CancelToken::new()), Err(Error::Closed)));
    assert_eq!(model.info().vocab_size, 32000);
    assert_exited(model.pid());
}

#[test]
fn close_reports_an_unsuccessful_exit() {
    let model = load("/models/BADEXIT");
    let err = model.close().unwrap_err();
    assert_eq!(
        err.to_string(),
        "backend \"mlx_lm\": the bridge process exited unsuccessfully (exit status: 4) after quit; stderr: mock bridge \
         starting"
    );
    assert!(model.close().is_ok());
}

#[test]
fn close_kills_a_bridge_that_ignores_quit() {
    let model = load_with("/models/SLOWQUIT", settings().backend_option("timeout_secs", "2"));
    let pid = model.pid();
    let err = model.close().unwrap_err();
    assert_starts_with(&err, "backend \"mlx_lm\": the bridge process did not exit within 2 s of quit and was killed");
    assert_exited(pid);
}

#[test]
fn close_during_a_stream_ends_it_with_closed() {
    let model = load("/models/mock");
    let mut stream = start(&model, "ENDLESS");
    next_token(&mut stream);
    model.close().unwrap();
    assert!(matches!(last_error(stream), Error::Closed));
    assert_exited(model.pid());
}

#[cfg(unix)]
#[test]
fn drop_kills_the_bridge_once_its_streams_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(dir.path().to_str().unwrap());
    let pid = model.pid();
    assert_eq!(std::fs::read_to_string(dir.path().join("pid")).unwrap(), pid.to_string());
    assert!(process_exists(pid));
    drop(model);
    assert!(!process_exists(pid));

    // A stream keeps the process alive after the handle is dropped.
    let model = load("/models/mock");
    let pid = model.pid();
    let mut stream = start(&model, "ENDLESS");
    drop(model);
    for _ in 0..3 {
        assert_eq!(next_token(&mut stream).text, "tick");
    }
    assert!(process_exists(pid));
    drop(stream);
    // The stream's thread ends the request, then drops the last reference and kills the bridge.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while process_exists(pid) && std::time::Instant::now() < deadline {
        thread::yield_now();
    }
    assert!(!process_exists(pid));
}

// ---- classify, batch generation, inspection -----------------------------------------------------

#[test]
fn classify_returns_one_result_per_prompt() {
    let model = load("/models/mock");
    let results = model.classify(&["a", "b", "c"], &GenerateSettings::new(), CancelToken::new()).unwrap();
    assert_eq!(
        results.iter().map(|r| (r.token.id, r.token.text.as_str())).collect::<Vec<_>>(),
        [(300, "yes"), (301, "no"), (302, "yes")]
    );
    assert!(results.iter().all(|r| r.logits.is_none()));
    assert_eq!(model.metrics().generated_tokens, 3);
    let s = GenerateSettings::new().logits(LogitsMode::LogProbs);
    let results = model.classify(&["a"], &s, CancelToken::new()).unwrap();
    assert_eq!((results[0].token.logprob, results[0].logits.clone()), (Some(-0.25), Some(vec![1.0, 2.0])));
    assert!(model.classify(&[], &s, CancelToken::new()).unwrap().is_empty());
    assert!(matches!(model.classify(&["a", ""], &s, CancelToken::new()), Err(Error::EmptyPrompt)));
    let err = model.classify(&["ERROR"], &s, CancelToken::new()).unwrap_err();
    assert_eq!(err.to_string(), "backend \"mlx_lm\": classify: simulated model error");
}

#[test]
fn batch_generate_reports_each_prompt() {
    let model = load("/models/mock");
    let s = GenerateSettings::new().max_tokens(2);
    let results = model.batch_generate(&["a", "", "ERROR", "b"], &s, CancelToken::new()).unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!((results[0].text(), results[3].text()), ("Hello ".to_owned(), "Hello ".to_owned()));
    assert!(matches!(results[1].error, Some(Error::EmptyPrompt)));
    assert_eq!(results[2].error.as_ref().unwrap().to_string(), "backend \"mlx_lm\": batch_generate: boom");
    assert!(results[0].is_ok());
    assert!(model.batch_generate(&[], &s, CancelToken::new()).unwrap().is_empty());
}

#[test]
fn inspect_returns_keys_and_queries() {
    let model = load("/models/mock");
    let inspector = model.attention_inspector().expect("the bridge inspects attention");
    let snap = inspector.inspect_attention("Hi", CancelToken::new()).unwrap();
    assert_eq!((snap.num_layers, snap.num_heads, snap.num_query_heads), (4, 2, 8));
    assert_eq!((snap.seq_len, snap.head_dim, snap.architecture.as_str()), (3, 4, "mock_model"));
    assert!(snap.has_queries());
    let expected = |layer: usize, head: usize, i: usize| (100 * layer + 10 * head + i) as f32 / 1000.0;
    for layer in 0..4 {
        for head in 0..2 {
            let k = snap.key(layer, head).unwrap();
            assert_eq!(k.len(), 12);
            assert!(k.iter().enumerate().all(|(i, v)| *v == expected(layer, head, i)));
        }
        assert_eq!(snap.query(layer, 7).unwrap()[1], -expected(layer, 7, 1));
    }
    assert!(matches!(inspector.inspect_attention("", CancelToken::new()), Err(Error::EmptyPrompt)));
    let err = inspector.inspect_attention("ERROR", CancelToken::new()).unwrap_err();
    assert_eq!(err.to_string(), "backend \"mlx_lm\": inspect: simulated inspect error");
    let err = inspector.inspect_attention("UNSUPPORTED", CancelToken::new()).unwrap_err();
    assert_eq!(err.to_string(), "backend \"mlx_lm\" does not support attention inspection of this architecture");
}
