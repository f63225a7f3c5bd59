// SPDX-License-Identifier: EUPL-1.2
//! `mlxr serve`'s API beyond plain completions, end to end on the built binary: the prompt cache
//! across a restart, keys, JSON bodies and local Hosts, `/metrics`, log-probabilities (against
//! mlx-lm's on SmolLM2), Anthropic's Messages API with the official `anthropic` package, and
//! several choices per request.

mod common;

use std::time::{Duration, Instant};

use common::{MODEL, Server, chat_body, expect_error, post, post_raw, post_stream, read_stream, text, tiny};
use serde_json::{Value, json};

#[test]
fn a_restarted_server_answers_a_long_system_prompt_warm() {
    let model = tiny(MODEL);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().to_str().unwrap();
    let system = "You are a careful assistant. Answer briefly, in plain words, and never make things up.".to_owned();
    let body = |question: &str| {
        json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
               "max_tokens": 6, "temperature": 0})
    };
    let cold = Server::start(&model, &["--prompt-cache-bytes", "0"]);
    let (status, expected) = post(&cold.url("/v1/chat/completions"), &body("Why is the sea salty?"));
    assert_eq!(status, 200, "{expected}");
    drop(cold);

    let first = Server::start(&model, &["--prompt-cache-dir", cache]);
    let (status, _) = post(&first.url("/v1/chat/completions"), &body("What is a river?"));
    assert_eq!(status, 200);
    // The entry is written once the engine has nothing to do (beside the target first, under a
    // hidden name, then renamed into place).
    let written =
        || std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| !e.file_name().to_string_lossy().starts_with('.'));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !written() {
        assert!(Instant::now() < deadline, "no prompt-cache file was written");
        std::thread::park_timeout(Duration::from_millis(20));
    }
    drop(first);

    let second = Server::start(&model, &["--prompt-cache-dir", cache]);
    assert_eq!(second.engine_stats()["batch"]["prompt_cache_entries"], 1);
    let (status, answer) = post(&second.url("/v1/chat/completions"), &body("Why is the sea salty?"));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"], expected["choices"][0]["message"], "warm answers equal cold ones");
    let cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached > 20, "the system prompt came from the restarted cache: {}", answer["usage"]);
}

/// A request with the given headers: the status and the JSON answer.
fn send(url: &str, method: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, Value) {
    let agent = common::agent();
    let mut r = match (method, body) {
        ("POST", Some(b)) => {
            let mut req = agent.post(url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            req.send(b.to_owned())
        }
        _ => {
            let mut req = agent.get(url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            req.call()
        }
    }
    .expect("a request");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().expect("the body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}")))
}

#[test]
fn keys_json_bodies_and_local_hosts_are_enforced() {
    let server = Server::start(&tiny(MODEL), &["--api-key", "sk-test"]);
    let chat = server.url("/v1/chat/completions");
    let body = chat_body(2).to_string();
    let json = ("content-type", "application/json");
    // No key, a wrong one, another scheme: 401; /health stays open.
    for auth in [None, Some("Bearer sk-wrong"), Some("Basic c2stdGVzdA=="), Some("sk-test")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().chain([json]).collect();
        let msg = expect_error(send(&chat, "POST", &headers, Some(&body)), 401, None);
        assert!(msg.contains("Authorization: Bearer"), "{msg}");
    }
    assert_eq!(send(&server.url("/v1/models"), "GET", &[], None).0, 401);
    assert_eq!(send(&server.url("/health"), "GET", &[], None).0, 200);
    let key = ("authorization", "Bearer sk-test");
    let (status, answer) = send(&chat, "POST", &[key, json], Some(&body));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(send(&server.url("/v1/models"), "GET", &[key], None).0, 200);
    // A body that does not say it is JSON never reaches a handler.
    for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let headers: Vec<(&str, &str)> = [key].into_iter().chain(content_type.map(|t| ("content-type", t))).collect();
        let msg = expect_error(send(&chat, "POST", &headers, Some(&body)), 415, None);
        assert!(msg.contains("application/json"), "{msg}");
    }
    // A page on another name that resolves to this machine (DNS rebinding) is refused.
    let msg = expect_error(send(&chat, "POST", &[key, json, ("host", "evil.example:8080")], Some(&body)), 403, None);
    assert!(msg.contains("evil.example"), "{msg}");
    assert_eq!(send(&chat, "POST", &[key, json, ("host", "localhost")], Some(&body)).0, 200);

    drop(server);

    // Listening beyond this machine without a key is warned about.
    let open = Server::start(&tiny(MODEL), &["--host", "0.0.0.0"]);
    let (code, stderr) = open.stop(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("without an API key"), "{stderr}");
}

/// `/metrics` after some traffic: the samples Prometheus's own parser reads from it (when the
/// fixtures' Python has `prometheus_client`), else the sample lines read here.
#[test]
fn metrics_are_served_in_prometheus_text_format() {
    let server = Server::start(&tiny(MODEL), &[]);
    for _ in 0..2 {
        let (status, _) = post(&server.url("/v1/chat/completions"), &chat_body(4));
        assert_eq!(status, 200);
    }
    assert_eq!(post_raw(&server.url("/v1/chat/completions"), "{").0, 400);
    let mut r = common::agent().get(&server.url("/metrics")).call().expect("GET /metrics");
    assert_eq!(r.status().as_u16(), 200);
    let content_type = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = r.body_mut().read_to_string().unwrap();
    let sample = |line: &str| -> f64 {
        let found = text.lines().find(|l| l.starts_with(line) && l[line.len()..].starts_with(' '));
        found.unwrap_or_else(|| panic!("no {line} in\n{text}"))[line.len() + 1..].parse().unwrap()
    };
    assert_eq!(sample("mlxr_requests_total{outcome=\"completed\"}"), 2.0);
    assert_eq!(sample("mlxr_http_responses_total{code=\"200\"}"), 2.0);
    assert_eq!(sample("mlxr_http_responses_total{code=\"400\"}"), 1.0);
    assert_eq!(sample("mlxr_generated_tokens_total"), 8.0);
    assert!(sample("mlxr_prompt_tokens_total") > 8.0);
    assert!(sample("mlxr_cached_prompt_tokens_total") > 0.0, "the second request reused the first's prompt");
    assert_eq!(sample("mlxr_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(sample("mlxr_inter_token_latency_seconds_count"), 6.0);
    assert_eq!(sample("mlxr_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), 2.0);
    assert_eq!(sample("mlxr_prompt_cache_hits_total"), 1.0);
    assert_eq!(sample("mlxr_engine_max_batch"), 32.0);
    let info =
        text.lines().find(|l| l.starts_with("mlxr_model_info{")).unwrap_or_else(|| panic!("no model info in\n{text}"));
    assert!(
        info.contains(",compute_dtype=\"") && info.contains(",compute_dtype_reason=\"") && info.ends_with("} 1"),
        "{info}"
    );

    let test = "metrics_are_served_in_prometheus_text_format";
    let Some(python) = std::env::var_os("MLXR_PYTHON").filter(|v| !v.is_empty()) else {
        common::skip(test, "MLXR_PYTHON is not set: Prometheus's own parser not run");
        return;
    };
    let parse = "import json, sys\nfrom prometheus_client.parser import text_string_to_metric_families as f\n\
                 print(json.dumps({m.name: [[s.name, s.labels, s.value] for s in m.samples] for m in f(sys.stdin.read())}))";
    let mut child = std::process::Command::new(&python)
        .args(["-c", parse])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting python");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = common::text(&out);
    assert!(out.status.success(), "Prometheus's parser refused the text: {stderr}");
    let parsed: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let families = parsed.as_object().unwrap();
    for family in [
        "mlxr_requests",
        "mlxr_http_responses",
        "mlxr_time_to_first_token_seconds",
        "mlxr_prompt_cache_hits",
        "mlxr_model_info",
    ] {
        assert!(families.contains_key(family), "{family} not parsed: {parsed}");
    }
    let ttft = &parsed["mlxr_time_to_first_token_seconds"];
    assert!(ttft.as_array().unwrap().iter().any(|s| s[0] == "mlxr_time_to_first_token_seconds_count" && s[2] == 2.0));
}

#[test]
fn log_probabilities_come_in_openai_shapes() {
    let server = Server::start(&tiny(MODEL), &[]);
    // The completions endpoint: `logprobs: N`, whole and streamed alike.
    let body = json!({"prompt": "The quick brown fox", "max_tokens": 5, "ignore_eos": true, "logprobs": 3});
    let (status, whole) = post(&server.url("/v1/completions"), &body);
    assert_eq!(status, 200, "{whole}");
    let lp = &whole["choices"][0]["logprobs"];
    let logprobs: Vec<f64> = lp["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(logprobs.len(), 5, "{lp}");
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{top:?}");
        // Greedy: the chosen token is the most likely one.
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!(logprobs[i] <= 0.0 && (logprobs[i] - best).abs() < 1e-6, "{} vs {best}", logprobs[i]);
    }
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let (_, events) = post_stream(&server.url("/v1/completions"), &streamed_body);
    let (_, chunks, done) = read_stream(events);
    assert!(done);
    let streamed: Vec<f64> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["token_logprobs"].as_array().cloned())
        .flatten()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // The same within rounding: the streamed request's prompt came from the prompt cache, its last
    // token in a pass of its own, where the whole answer's went in in one pass.
    assert_eq!(streamed.len(), logprobs.len());
    for (s, w) in streamed.iter().zip(&logprobs) {
        assert!(
            (s - w).abs() < 1e-5,
            "streamed log-probabilities equal the whole answer's: {streamed:?} vs {logprobs:?}"
        );
    }

    // Chat: `logprobs: true` with `top_logprobs`.
    let mut chat = chat_body(4);
    chat["ignore_eos"] = json!(true);
    chat["logprobs"] = json!(true);
    chat["top_logprobs"] = json!(2);
    let (status, answer) = post(&server.url("/v1/chat/completions"), &chat);
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4, "{answer}");
    for entry in content {
        let token = entry["token"].as_str().unwrap();
        assert_eq!(entry["bytes"], json!(token.as_bytes()));
        assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 2, "{entry}");
        assert_eq!(entry["top_logprobs"][0]["logprob"], entry["logprob"], "greedy takes the most likely: {entry}");
    }
    // Not asked for: null, as OpenAI answers.
    let (_, plain) = post(&server.url("/v1/chat/completions"), &chat_body(2));
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");

    // What OpenAI refuses, refused with the field named.
    let url = server.url("/v1/chat/completions");
    let mut too_many = chat.clone();
    too_many["top_logprobs"] = json!(21);
    expect_error(post(&url, &too_many), 400, Some("top_logprobs"));
    let mut without = chat_body(2);
    without["top_logprobs"] = json!(2);
    expect_error(post(&url, &without), 400, Some("top_logprobs"));
    let mut stops = chat_body(2);
    stops["stop"] = json!(["a", "b", "c", "d", "e"]);
    expect_error(post(&url, &stops), 400, Some("stop"));
}

/// SmolLM2's greedy answer's log-probabilities, served, against mlx-lm's (the golden's `chat` run).
#[test]
fn served_log_probabilities_equal_mlx_lm_s() {
    let Some(model) = common::smollm2("served_log_probabilities_equal_mlx_lm_s") else { return };
    let golden =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/smollm2-135m-instruct.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    let run = golden["greedy"].as_array().unwrap().iter().find(|g| g["name"] == "chat").expect("a chat run");
    let expected: Vec<f64> = run["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    // The golden is mlx-lm's default run: the checkpoint's bfloat16 (`auto` may compute in float32).
    let server = Server::start(&model, &["--dtype", "bfloat16"]);
    let body = json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": expected.len(), "ignore_eos": true, "logprobs": true, "top_logprobs": 5,
    });
    let (status, answer) = post(&server.url("/v1/chat/completions"), &body);
    assert_eq!(status, 200, "{answer}");
    let usage = &answer["usage"];
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap() as usize, run["prompt"].as_array().unwrap().len(), "{usage}");
    let content = answer["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let got: Vec<f64> = content.iter().map(|e| e["logprob"].as_f64().unwrap()).collect();
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!((g - e).abs() <= 1e-3, "token {i}: ours {g}, mlx-lm {e}");
    }
}

#[test]
fn the_anthropic_python_package_talks_to_the_messages_api() {
    let test = "the_anthropic_python_package_talks_to_the_messages_api";
    let server = Server::start(&tiny(MODEL), &["--api-key", "sk-ant-test"]);
    // Without the SDK: the whole answer's shape, and Anthropic's error shape.
    let url = server.url("/v1/messages");
    let key = ("x-api-key", "sk-ant-test");
    let body = json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hello there"}]});
    let (status, answer) = send(&url, "POST", &[key, ("content-type", "application/json")], Some(&body.to_string()));
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["type"].as_str(), answer["role"].as_str()), (Some("message"), Some("assistant")));
    assert!(answer["usage"]["output_tokens"].as_u64().is_some_and(|n| (1..=4).contains(&n)), "{answer}");
    let (status, error) = send(&url, "POST", &[key, ("content-type", "application/json")], Some("{\"messages\": []}"));
    assert_eq!(status, 400);
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");

    let Some(python) = std::env::var_os("MLXR_PYTHON").filter(|v| !v.is_empty()) else {
        common::skip(test, "MLXR_PYTHON is not set (cargo xtask test sets it to the fixtures virtualenv)");
        return;
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/anthropic_client.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(["--base-url", &server.url(""), "--model", MODEL, "--key", "sk-ant-test"])
        .output()
        .expect("running the anthropic client script");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for check in ["message: ok", "stream: ok", "bad request: ok", "wrong key: ok"] {
        assert!(stdout.lines().any(|l| l == check), "{check} missing:\n{stdout}");
    }
}

#[test]
fn several_choices_decode_together_whole_and_streamed() {
    let server = Server::start(&tiny(MODEL), &[]);
    let url = server.url("/v1/chat/completions");
    // Seeded sampling: each choice draws with its own seed (seed + index), so they repeat.
    let mut body = chat_body(6);
    body["n"] = json!(3);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(7);
    body["ignore_eos"] = json!(true);
    let (status, whole) = post(&url, &body);
    assert_eq!(status, 200, "{whole}");
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let texts: Vec<&str> = choices.iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{c}");
    }
    assert_eq!(whole["usage"]["completion_tokens"], 18, "{}", whole["usage"]);
    // Choice i equals a single request seeded seed + i.
    for (i, text) in texts.iter().enumerate() {
        let mut one = chat_body(6);
        one["temperature"] = json!(1.0);
        one["seed"] = json!(7 + i);
        one["ignore_eos"] = json!(true);
        let (_, alone) = post(&url, &one);
        assert_eq!(alone["choices"][0]["message"]["content"].as_str().unwrap(), *text, "choice {i}");
    }
    // Streamed: each chunk names its choice; each choice gets its finish reason; the usage last.
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, events) = post_stream(&url, &body);
    assert_eq!(status, 200);
    let (_, chunks, done) = read_stream(events);
    assert!(done);
    let mut streamed = vec![String::new(); 3];
    let mut finished = [false; 3];
    for c in &chunks {
        for choice in c["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            streamed[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            finished[i] |= choice["finish_reason"].is_string();
        }
    }
    assert_eq!(streamed, texts, "streamed choices equal the whole answer's");
    assert!(finished.iter().all(|&f| f));
    let usage = &chunks.last().unwrap()["usage"];
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage[field], whole["usage"][field], "{usage}");
    }
    expect_error(post(&url, &json!({"messages": [{"role": "user", "content": "x"}], "n": 17})), 400, Some("n"));
}

#[test]
fn speculative_decoding_is_served_exactly_and_counted() {
    let model = tiny(MODEL);
    let body = json!({"model": MODEL, "prompt": "a b c d a b c d a b c d a b", "max_tokens": 24, "temperature": 0});
    let plain = Server::start(&model, &[]);
    let (status, expected) = post(&plain.url("/v1/completions"), &body);
    assert_eq!(status, 200, "{expected}");
    assert!(expected["usage"].get("completion_tokens_details").is_none(), "{}", expected["usage"]);
    drop(plain);
    for flags in [&["--prompt-lookup", "--num-draft-tokens", "4"][..], &["--draft-model", &model][..]] {
        let server = Server::start(&model, flags);
        let (status, answer) = post(&server.url("/v1/completions"), &body);
        assert_eq!(status, 200, "{flags:?}: {answer}");
        assert_eq!(answer["choices"][0]["text"], expected["choices"][0]["text"], "{flags:?}: greedy text is the same");
        let details = &answer["usage"]["completion_tokens_details"];
        let accepted = details["accepted_prediction_tokens"].as_u64().unwrap();
        let rejected = details["rejected_prediction_tokens"].as_u64().unwrap();
        assert!(accepted + rejected > 0, "{flags:?}: {}", answer["usage"]);
        let text = common::agent().get(&server.url("/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
        let sample = |name: &str| -> u64 {
            let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
            line.unwrap_or_else(|| panic!("no {name} in\n{text}"))[name.len() + 1..].parse::<f64>().unwrap() as u64
        };
        assert_eq!(sample("mlxr_draft_tokens_total"), accepted + rejected, "{flags:?}");
        assert_eq!(sample("mlxr_accepted_draft_tokens_total"), accepted, "{flags:?}");
        assert!(sample("mlxr_speculative_steps_total") > 0, "{flags:?}");
    }
}
