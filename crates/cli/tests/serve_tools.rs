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
