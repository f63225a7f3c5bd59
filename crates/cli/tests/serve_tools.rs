// SPDX-License-Identifier: EUPL-1.2
//! `mlxr serve`'s tool calls and structured output, end to end on the built binary: the official
//! `openai` package on SmolLM2 (forced calls whole and streamed, a named function, a tool result
//! in the history, a batch of different JSON Schemas each valid, `json_object`, refusals), the
//! official `anthropic` package (tool use, tool results, stop sequences), and the errors that
//! name the field, on a tiny model.

mod common;

use common::{MODEL, Server, expect_error, post, text, tiny};
use serde_json::{Value, json};

fn ask(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

#[test]
fn bad_tool_and_format_fields_are_named() {
    let server = Server::start(&tiny(MODEL), &[]);
    let url = server.url("/v1/chat/completions");
    let tool = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
    let cases = [
        (json!({"tools": [{"type": "function", "function": {}}]}), "tools"),
        (json!({"tools": [tool], "tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"response_format": {"type": "yaml"}}), "response_format.type"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"tools": [tool], "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"messages": [{"role": "tool", "content": "42"}]}), "messages[0].tool_call_id"),
    ];
    for (extra, param) in cases {
        let message = expect_error(post(&url, &ask(extra.clone())), 400, Some(param));
        assert!(!message.is_empty(), "{extra}");
    }
    let message = expect_error(
        post(
            &url,
            &ask(json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}})),
        ),
        400,
        Some("constraint"),
    );
    assert!(message.contains("nonsense"), "{message}");
}

/// qwen3-tiny with `testdata/templates/qwen-tools.jinja` as its chat template (and room for its
/// long system turn), in a temporary directory named `qwen3-tiny`.
fn qwen_with_tools() -> tempfile::TempDir {
    let src = std::path::PathBuf::from(tiny(MODEL));
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(MODEL);
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }
    let edit = |file: &str, key: &str, value: Value| {
        let path = copy.join(file);
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/templates/qwen-tools.jinja");
    edit("tokenizer_config.json", "chat_template", Value::String(std::fs::read_to_string(template).unwrap()));
    edit("config.json", "max_position_embeddings", json!(2048));
    dir
}

/// A tools template's model (Hermes form) over HTTP: a forced call, whole and streamed, comes back
/// as `tool_calls` of an offered tool with arguments valid for it, whatever the random weights say.
#[test]
fn a_qwen_style_template_answers_forced_calls_as_tool_calls() {
    let dir = qwen_with_tools();
    let server = Server::start(dir.path().join(MODEL).to_str().unwrap(), &[]);
    let url = server.url("/v1/chat/completions");
    let zone = json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": false}}});
    for seed in 0..3 {
        let body = ask(json!({"tools": [zone], "tool_choice": "required", "parallel_tool_calls": false,
            "max_tokens": 120, "temperature": 1.0, "seed": seed}));
        let (status, answer) = post(&url, &body);
        assert_eq!(status, 200, "{answer}");
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_time", "{answer}");
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(args == json!({"zone": "UTC"}) || args == json!({"zone": "CET"}), "{args}");

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (status, events) = common::post_stream(&url, &streamed);
        assert_eq!(status, 200);
        let (_, chunks, done) = common::read_stream(events);
        assert!(done);
        let calls: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0)).collect();
        assert_eq!(calls.len(), 1, "{chunks:?}");
        assert_eq!((calls[0]["index"].as_u64(), &calls[0]["function"]), (Some(0), &call["function"]));
        let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str());
        assert_eq!(finish, Some("tool_calls"));
    }
}

/// Runs an SDK script of `tests/` against a server on SmolLM2 (`base` is the URL's path) and
/// checks that it printed `NAME: ok` for each of `checks`. Needs `MLXR_PYTHON` (set by
/// `cargo xtask test`) and the converted SmolLM2 (`cargo xtask fixtures`); skipped without them.
fn sdk_script_on_smollm2(test: &str, script: &str, base: &str, checks: &[&str]) {
    let Some(python) = std::env::var_os("MLXR_PYTHON").filter(|v| !v.is_empty()) else {
        common::skip(test, "MLXR_PYTHON is not set (cargo xtask test sets it to the fixtures virtualenv)");
        return;
    };
    let Some(model) = common::smollm2(test) else { return };
    let server = Server::start(&model, &[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(["--base-url", &server.url(base), "--model", "smollm2-135m-instruct"])
        .output()
        .expect("running the SDK script");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for check in checks {
        assert!(stdout.lines().any(|l| l == format!("{check}: ok")), "missing {check:?} in:\n{stdout}");
    }
}

/// The official `openai` package (`openai_tools.py`).
#[test]
fn the_openai_package_gets_tool_calls_and_valid_json() {
    let checks = ["required", "required stream", "named", "tool result", "json_schema", "json_object", "errors"];
    sdk_script_on_smollm2("the_openai_package_gets_tool_calls_and_valid_json", "openai_tools.py", "/v1", &checks);
}

/// The official `anthropic` package (`anthropic_tools.py`): tool use whole and streamed, a tool
/// result in the history, and `stop_reason` `stop_sequence` naming the sequence.
#[test]
fn the_anthropic_package_gets_tool_use_and_stop_sequences() {
    let checks = ["tool use", "tool use stream", "tool result", "stop sequence"];
    sdk_script_on_smollm2("the_anthropic_package_gets_tool_use_and_stop_sequences", "anthropic_tools.py", "", &checks);
}
