// SPDX-License-Identifier: EUPL-1.2
//! `mlxr serve` end to end: a real HTTP client against the built binary on a tiny fixture model
//! (and SmolLM2 when it is there), streaming and not, several requests at once, a client that
//! disconnects mid-stream, malformed requests, and the official `openai` Python package.

mod common;

use std::time::{Duration, Instant};

use common::{
    Server, chat_body, endless_chat, expect_error, get, post, post_raw, post_stream, read_stream, run, text, tiny,
};
use serde_json::{Value, json};

use common::MODEL;

#[test]
fn chat_completions_whole_and_streamed_agree() {
    let server = Server::start(&tiny(MODEL), &[]);
    let (status, whole) = post(&server.url("/v1/chat/completions"), &chat_body(12));
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], MODEL);
    assert!(whole["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")), "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().expect("content is text");
    let usage = &whole["usage"];
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion_tokens), "{usage}");
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 3, "the chat template adds tokens: {usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().unwrap() + completion_tokens));
    let finish = choice["finish_reason"].as_str().unwrap();
    assert_eq!(finish, if completion_tokens == 12 { "length" } else { "stop" });

    let mut body = chat_body(12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, events) = post_stream(&server.url("/v1/chat/completions"), &body);
    assert_eq!(status, 200);
    let (streamed, chunks, done) = read_stream(events);
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(streamed, content, "greedy: the stream says what the whole answer said");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last_choice = chunks.iter().rev().find(|c| c["choices"].get(0).is_some()).unwrap();
    assert_eq!(last_choice["choices"][0]["finish_reason"], finish);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    // The same prompt again: all of it but its last token comes from the prompt cache.
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0, "nothing cached before the first request");
    let mut expected = usage.clone();
    expected["prompt_tokens_details"]["cached_tokens"] = json!(usage["prompt_tokens"].as_u64().unwrap() - 1);
    assert_eq!(usage_chunk["usage"], expected);
    let batch = server.engine_stats()["batch"].clone();
    assert!(batch["prompt_cache_hits"].as_u64() >= Some(1), "{batch}");
    let ids: Vec<&str> = chunks.iter().filter_map(|c| c["id"].as_str()).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "one id per stream");
}

#[test]
fn completions_match_the_generate_command() {
    let model = tiny(MODEL);
    let server = Server::start(&model, &[]);
    let prompt = "The quick brown fox";
    let (status, whole) =
        post(&server.url("/v1/completions"), &json!({"model": MODEL, "prompt": prompt, "max_tokens": 10}));
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    let served = whole["choices"][0]["text"].as_str().unwrap().to_owned();

    let out = run(&["generate", "--model", &model, "--max-tokens", "10", "--ignore-chat-template", prompt], "");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, format!("{served}\n"), "the server and the command line generate the same text");

    let (status, events) =
        post_stream(&server.url("/v1/completions"), &json!({"prompt": [prompt], "max_tokens": 10, "stream": true}));
    assert_eq!(status, 200);
    let (streamed, chunks, done) = read_stream(events);
    assert!(done);
    assert_eq!(streamed, served);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert!(chunks.iter().all(|c| c["usage"].is_null()), "no usage unless asked for");
}

#[test]
fn models_health_and_unknown_paths() {
    let server = Server::start(&tiny(MODEL), &[]);
    let (status, list) = get(&server.url("/v1/models"));
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], MODEL);
    assert_eq!(list["data"][0]["object"], "model");
    let (status, one) = get(&server.url(&format!("/v1/models/{MODEL}")));
    assert_eq!((status, &one["id"]), (200, &json!(MODEL)));
    let (status, missing) = get(&server.url("/v1/models/gpt-4"));
    assert_eq!((status, &missing["error"]["code"]), (404, &json!("model_not_found")));
    let (status, health) = get(&server.url("/health"));
    assert_eq!((status, &health["status"]), (200, &json!("ok")));
    assert!(health["compute_dtype"].is_string(), "{health}");
    assert!(health["compute_dtype_reason"].as_str().is_some_and(|r| !r.is_empty()), "{health}");
    let (status, nowhere) = get(&server.url("/v2/nothing"));
    assert_eq!(status, 404);
    assert_eq!(nowhere["error"]["message"], "no such endpoint: GET /v2/nothing");
    assert!(server.base.starts_with("http://127.0.0.1:"), "binds to localhost by default: {}", server.base);
}

#[test]
fn the_model_is_warmed_up_before_the_server_listens() {
    // The warm-up generates in a chat session of its own: the prompt cache that requests share
    // stays empty, and the engine's counters start at 0 for the first request either way.
    let model = tiny(MODEL);
    for (flags, warmed) in [(&[][..], true), (&["--no-warmup"][..], false), (&["--draft-model", &model][..], true)] {
        let server = Server::start(&model, flags);
        let (status, health) = get(&server.url("/health"));
        assert_eq!(status, 200, "{health}");
        let batch = &health["engine"]["batch"];
        assert_eq!(batch["decode_steps"], 0, "{flags:?}: {health}");
        assert_eq!(batch["prompt_cache_entries"], 0, "{flags:?}: {health}");
        let (code, stderr) = server.stop(Duration::from_secs(20));
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(stderr.contains("warmed up"), warmed, "{flags:?}: {stderr}");
        // Said before it starts, with why it may take minutes on a new machine.
        let starting = stderr.find("warming up: kernels the GPU compiles on first use");
        assert_eq!(starting.is_some(), warmed, "{flags:?}: {stderr}");
        assert!(starting <= stderr.find("warmed up"), "{stderr}");
        // Nine generations at once, their prompts cut to what the tiny model's 128 positions take.
        assert_eq!(stderr.contains("prompts=9"), warmed, "{flags:?}: {stderr}");
        // Then one alone, which speculates where the server does: its draft's steps and the
        // verifying pass are compiled before the first request too.
        if warmed {
            let speculated = stderr.contains("speculative_steps=") && !stderr.contains("speculative_steps=0");
            assert_eq!(speculated, flags.contains(&"--draft-model"), "{flags:?}: {stderr}");
        }
    }
}

#[test]
fn malformed_requests_get_clear_4xx_errors() {
    let server = Server::start(&tiny(MODEL), &["--max-tokens-limit", "64", "--max-body-bytes", "2048"]);
    let chat = server.url("/v1/chat/completions");
    let msg = expect_error(post_raw(&chat, "{\"messages\": [ "), 400, None);
    assert!(msg.starts_with("the request body is not valid JSON"), "{msg}");
    let msg = expect_error(post_raw(&chat, "[]"), 400, None);
    assert_eq!(msg, "the request body must be a JSON object");
    let msg = expect_error(post(&chat, &json!({"model": MODEL})), 400, None);
    assert_eq!(msg, "invalid request: missing field `messages`");
    let msg = expect_error(post(&chat, &json!({"model": "gpt-4o", "messages": []})), 404, Some("model"));
    assert!(msg.contains("\"gpt-4o\" does not exist"), "{msg}");

    let bad = |extra: Value| {
        let mut body = chat_body(4);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        post(&chat, &body)
    };
    let msg = expect_error(bad(json!({"temperature": -0.5})), 400, Some("temperature"));
    assert!(msg.contains("temperature = -0.5"), "{msg}");
    expect_error(bad(json!({"top_p": 1.5})), 400, Some("top_p"));
    expect_error(bad(json!({"n": 17})), 400, Some("n"));
    let msg = expect_error(bad(json!({"max_tokens": 65})), 400, Some("max_tokens"));
    assert_eq!(msg, "max_tokens = 65 is more than this server's limit of 64");
    expect_error(bad(json!({"max_completion_tokens": 100})), 400, Some("max_completion_tokens"));
    expect_error(bad(json!({"temperature": "warm"})), 400, Some("temperature"));
    expect_error(bad(json!({"stop": [""]})), 400, Some("stop"));
    expect_error(bad(json!({"messages": []})), 400, Some("messages"));
    expect_error(
        bad(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
        400,
        Some("messages[0].content[0]"),
    );
    let long = json!([{"role": "user", "content": "word ".repeat(300)}]);
    let msg = expect_error(bad(json!({"messages": long})), 400, Some("prompt"));
    assert!(msg.contains("longer than the context length of 128 tokens"), "{msg}");
    let (status, ok) = bad(json!({"some_future_field": {"x": 1}, "user": "ignored"}));
    assert_eq!(status, 200, "unknown fields are ignored: {ok}");

    let big = json!({"messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let msg = expect_error(post(&chat, &big), 413, None);
    assert_eq!(msg, "the request body is larger than the limit of 2048 bytes");
    let msg = expect_error(post_raw(&server.url("/v1/completions"), "{\"prompt\": 5}"), 400, Some("prompt"));
    assert!(msg.starts_with("invalid field prompt"), "{msg}");
    // After all that the server still serves.
    assert_eq!(post(&chat, &chat_body(2)).0, 200);
}

#[test]
fn running_out_of_context_ends_with_length() {
    let server = Server::start(&tiny(MODEL), &["--context-length", "24"]);
    let body = json!({"prompt": "one two", "max_tokens": 40, "ignore_eos": true});
    let (status, answer) = post(&server.url("/v1/completions"), &body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    assert_eq!(answer["usage"]["total_tokens"], 24, "the context is full: {answer}");
    let body = json!({"prompt": "one two", "max_tokens": 3, "ignore_eos": true});
    let (_, answer) = post(&server.url("/v1/completions"), &body);
    assert_eq!(
        (&answer["choices"][0]["finish_reason"], &answer["usage"]["completion_tokens"]),
        (&json!("length"), &json!(3))
    );
}

#[test]
fn concurrent_requests_queue_and_all_complete() {
    let server = Server::start(
        &tiny(MODEL),
        &["--max-concurrent", "2", "--kv-cache-bytes", "50000000", "--prompt-cache-bytes", "3000000"],
    );
    let expected = post(&server.url("/v1/completions"), &json!({"prompt": "once upon", "max_tokens": 16})).1;
    let expected = expected["choices"][0]["text"].as_str().unwrap().to_owned();
    let url = server.url("/v1/completions");
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let url = url.clone();
                s.spawn(move || {
                    let body = json!({"prompt": "once upon", "max_tokens": 16, "stream": i % 2 == 0});
                    if i % 2 == 0 {
                        let (status, events) = post_stream(&url, &body);
                        let (text, _, done) = read_stream(events);
                        assert!(done);
                        (status, json!({"choices": [{"text": text}]}))
                    } else {
                        post(&url, &body)
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a client thread")).collect()
    });
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["text"], expected.as_str(), "every concurrent answer is the greedy one");
    }
    // The last answer can reach the client a moment before the engine's counters settle.
    let stats = server.wait_for("every request is counted as completed", Duration::from_secs(30), |s| {
        s["running"] == 0 && s["completed"] == 7
    });
    assert_eq!(stats["completed"], 7);
    assert_eq!(stats["running"], 0);
    // The metal engine batches what it holds and says so.
    let batch = &stats["batch"];
    assert_eq!((batch["max_batch"].as_u64(), batch["running"].as_u64()), (Some(32), Some(0)), "{stats}");
    assert!(batch["decode_steps"].as_u64().is_some_and(|n| n >= 16), "{stats}");
    assert_eq!(batch["kv_budget_bytes"].as_u64(), Some(50_000_000), "{stats}");
    assert_eq!(batch["prompt_cache_capacity_bytes"].as_u64(), Some(3_000_000), "{stats}");
    assert!(batch["kv_bytes_per_token"].as_u64().is_some_and(|n| n > 0), "{stats}");
}

#[test]
fn a_full_queue_is_refused_with_429() {
    let server =
        Server::start(&tiny(MODEL), &["--max-concurrent", "1", "--max-queue", "0", "--max-tokens-limit", "100000"]);
    let body = json!({"prompt": "a", "max_tokens": 100000, "ignore_eos": true, "stream": true});
    let (status, mut events) = post_stream(&server.url("/v1/completions"), &body);
    assert_eq!(status, 200);
    assert!(events.next().is_some(), "the long generation has started");
    let msg = expect_error(post(&server.url("/v1/completions"), &json!({"prompt": "b", "max_tokens": 2})), 429, None);
    assert!(msg.starts_with("the server is busy"), "{msg}");
    drop(events);
    server.wait_for("the cancelled generation ends", Duration::from_secs(60), |s| s["running"] == 0);
    assert_eq!(post(&server.url("/v1/completions"), &json!({"prompt": "b", "max_tokens": 2})).0, 200);
}

#[test]
fn a_request_that_waits_too_long_gets_503() {
    let server = Server::start(
        &tiny(MODEL),
        &["--max-concurrent", "1", "--queue-timeout", "0.2", "--max-tokens-limit", "100000"],
    );
    let body = json!({"prompt": "a", "max_tokens": 100000, "ignore_eos": true, "stream": true});
    let (_, mut events) = post_stream(&server.url("/v1/completions"), &body);
    assert!(events.next().is_some(), "the long generation has started");
    let started = Instant::now();
    let msg = expect_error(post(&server.url("/v1/completions"), &json!({"prompt": "b", "max_tokens": 2})), 503, None);
    assert_eq!(msg, "the server is busy: no turn came within 0.2 s; try again later");
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited its turn first");
    drop(events);
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    let server = Server::start(&tiny(MODEL), &["--max-tokens-limit", "100000"]);
    let events = endless_chat(&server);
    assert_eq!(server.engine_stats()["running"], 1);
    drop(events);
    let stats = server.wait_for("the engine stops after the disconnect", Duration::from_secs(60), |s| {
        s["running"] == 0 && s["cancelled"] == 1
    });
    let tokens = stats["cancelled_generation_tokens"].as_u64().unwrap();
    assert!(tokens < 100000, "the cancelled generation stopped early: {stats}");
    // The next request is served at once, not after 100000 tokens.
    let started = Instant::now();
    let (status, answer) = post(&server.url("/v1/chat/completions"), &chat_body(4));
    assert_eq!(status, 200, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(30), "served promptly: {:?}", started.elapsed());
    let stats = server.wait_for("the next request is counted as completed", Duration::from_secs(30), |s| {
        s["running"] == 0 && s["completed"] == 1
    });
    assert_eq!(stats["completed"], 1);
}

#[test]
fn a_client_that_disconnects_before_a_whole_answer_cancels_it_too() {
    use std::io::Write;
    let server = Server::start(&tiny(MODEL), &["--max-tokens-limit", "100000"]);
    let body = json!({"prompt": "x", "max_tokens": 100000, "ignore_eos": true}).to_string();
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut socket = std::net::TcpStream::connect(&addr).expect("connecting");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).and_then(|()| socket.write_all(body.as_bytes())).expect("sending");
    server.wait_for("the generation starts", Duration::from_secs(60), |s| s["running"] == 1);
    socket.shutdown(std::net::Shutdown::Both).expect("closing");
    drop(socket);
    let stats = server.wait_for("the engine stops after the disconnect", Duration::from_secs(60), |s| {
        s["running"] == 0 && s["cancelled"] == 1
    });
    assert!(stats["cancelled_generation_tokens"].as_u64().unwrap() < 100000, "{stats}");
    assert_eq!(stats["completed"], 0);
}

#[test]
fn sigterm_stops_the_server_cleanly_mid_stream() {
    let server = Server::start(&tiny(MODEL), &["--max-tokens-limit", "100000"]);
    let body = json!({"prompt": "x", "max_tokens": 100000, "ignore_eos": true, "stream": true});
    let (_, mut events) = post_stream(&server.url("/v1/completions"), &body);
    assert!(events.next().is_some());
    let (code, stderr) = server.stop(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
    // The client's stream ends (with an error event or just the end of the body).
    let rest: Vec<String> = events.collect();
    assert!(rest.iter().all(|d| d != "[DONE]"), "a cancelled stream does not claim to be done");
}

#[test]
fn a_bad_model_directory_fails_before_listening() {
    let out = run(&["serve", "--model", "/no/such/model", "--port", "0"], "");
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(stderr.contains("mlxr: error: backend \"metal\" failed to load model /no/such/model"), "{stderr}");
}

#[test]
fn the_mlx_lm_backend_serves_the_same_answers() {
    let test = "the_mlx_lm_backend_serves_the_same_answers";
    let Some(python) = std::env::var("MLXR_PYTHON").ok().filter(|p| !p.is_empty()) else {
        common::skip(test, "MLXR_PYTHON is not set (cargo xtask test sets it to the fixtures virtualenv)");
        return;
    };
    // The checkpoint's own type on both sides (metal's `auto` computes in float32 on an x86 CPU).
    let metal = Server::start(&tiny(MODEL), &["--dtype", "bfloat16"]);
    let bridge = Server::start(&tiny(MODEL), &["--backend", "mlx_lm", "--python", &python, "--dtype", "bfloat16"]);
    let (_, expected) = post(&metal.url("/v1/chat/completions"), &chat_body(12));
    let (status, answer) = post(&bridge.url("/v1/chat/completions"), &chat_body(12));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"], expected["choices"][0]["message"]);
    assert_eq!(answer["usage"], expected["usage"]);
    let mut body = chat_body(12);
    body["stream"] = json!(true);
    let (_, events) = post_stream(&bridge.url("/v1/chat/completions"), &body);
    let (streamed, _, done) = read_stream(events);
    assert!(done);
    assert_eq!(streamed, expected["choices"][0]["message"]["content"].as_str().unwrap());
}

#[test]
fn smollm2_answers_over_http() {
    let Some(model) = common::smollm2("smollm2_answers_over_http") else { return };
    let server = Server::start(&model, &[]);
    let body = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 40});
    let (status, answer) = post(&server.url("/v1/chat/completions"), &body);
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{content}");
}

/// The official `openai` Python package against the server: chat with and without streaming,
/// completions, four requests at once, a stream closed after two chunks (its generation stops),
/// and the errors for an unknown model and a bad setting. Needs `MLXR_PYTHON` (set by `cargo xtask test` to the fixtures virtualenv).
#[test]
fn the_openai_python_package_talks_to_the_server() {
    let test = "the_openai_python_package_talks_to_the_server";
    let Some(python) = std::env::var_os("MLXR_PYTHON").filter(|v| !v.is_empty()) else {
        common::skip(test, "MLXR_PYTHON is not set (cargo xtask test sets it to the fixtures virtualenv)");
        return;
    };
    let probe = std::process::Command::new(&python).args(["-c", "import openai"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        common::skip(test, "the MLXR_PYTHON interpreter cannot import openai (run `cargo xtask fixtures`)");
        return;
    }
    let server = Server::start(&tiny(MODEL), &["--max-concurrent", "2"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(["--base-url", &server.url("/v1"), "--model", MODEL])
        .env("OPENAI_API_KEY", "not-needed")
        .output()
        .expect("running the openai client script");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    for check in [
        "chat: ok",
        "chat stream: ok",
        "completions: ok",
        "completions stream: ok",
        "concurrent: ok",
        "disconnect: ok",
        "bad model: ok",
        "bad setting: ok",
    ] {
        assert!(lines.contains(&check), "missing {check:?} in:\n{stdout}");
    }
    // The script's answers are the server's greedy answers.
    let (_, whole) = post(&server.url("/v1/chat/completions"), &chat_body(12));
    let expected = format!("chat text: {}", serde_json::to_string(&whole["choices"][0]["message"]["content"]).unwrap());
    assert!(stdout.lines().any(|l| l == expected), "{expected} not in:\n{stdout}");
}

#[test]
fn bad_server_flags_fail_before_loading() {
    let out = run(&["serve", "--model", &tiny(MODEL), "--port", "0", "--max-tokens-limit", "0"], "");
    assert!(!out.status.success());
    assert_eq!(text(&out).1, "mlxr: error: --max-tokens-limit and --default-max-tokens must be at least 1\n");
    let out = run(&["serve", "--model", &tiny(MODEL), "--port", "0", "--queue-timeout", "-1"], "");
    assert!(text(&out).1.contains("--queue-timeout -1: must be a number of seconds >= 0"), "{:?}", text(&out));
}
