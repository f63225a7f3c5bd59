// SPDX-License-Identifier: EUPL-1.2
//! LoRA adapters served beside the base model, end to end on the built binary: an adapter
//! trained with `mlxr lora` on SmolLM2 is served with `--adapter NAME=DIR` and answers as
//! `mlxr generate --adapter DIR` does; a second one, trained while the server runs, is loaded
//! with `POST /v1/adapters`, served, and unloaded with `DELETE`; bad names and directories are
//! refused at start and at run time with the reason.

mod common;

use std::path::Path;

use common::{MODEL, Server, expect_error, get, post, run, text, tiny};
use serde_json::{Value, json};

/// A few records that teach the model to answer "Say N" its own way.
fn write_data(dir: &Path, answer: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let train: String =
        (0..8).map(|i| format!("{{\"prompt\": \"Say {i}\", \"completion\": \" {answer} {i} {answer}\"}}\n")).collect();
    std::fs::write(dir.join("train.jsonl"), train).unwrap();
    let valid: String =
        (3..5).map(|i| format!("{{\"prompt\": \"Say {i}\", \"completion\": \" {answer} {i}\"}}\n")).collect();
    std::fs::write(dir.join("valid.jsonl"), valid).unwrap();
}

/// `mlxr lora` for a few steps; the adapter lands in `out`.
fn train(model: &str, data: &Path, out: &Path, targets: &str) {
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "lora",
        "--model",
        model,
        "--data",
        d,
        "--adapter-path",
        o,
        "--iters",
        "4",
        "--batch-size",
        "2",
        "--learning-rate",
        "2e-2",
        "--rank",
        "4",
        "--targets",
        targets,
        "--json",
    ];
    let out = run(&args, "");
    assert!(out.status.success(), "{}", text(&out).1);
}

/// `mlxr generate`'s greedy text for `prompt`, with `extra` flags.
fn generate(model: &str, prompt: &str, extra: &[&str]) -> String {
    let out = run(&[&["generate", "--model", model, "--max-tokens", "8", "--raw"][..], extra, &[prompt]].concat(), "");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned()
}

/// The server's greedy completion of `prompt` by `model`.
fn complete(server: &Server, model: &str, prompt: &str) -> (u16, Value) {
    post(&server.url("/v1/completions"), &json!({"model": model, "prompt": prompt, "max_tokens": 8}))
}

fn delete(url: &str) -> (u16, Value) {
    let mut r = common::agent().delete(url).call().expect("a DELETE");
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().expect("the body");
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}")))
}

#[test]
fn an_adapter_trained_with_lora_is_served_loaded_and_unloaded_by_a_running_server() {
    let Some(model) = common::smollm2("an_adapter_trained_with_lora_is_served") else { return };
    let work = tempfile::tempdir().unwrap();
    let root = work.path();
    write_data(&root.join("data-a"), "banana");
    train(&model, &root.join("data-a"), &root.join("a"), "q_proj,v_proj");
    let prompt = "Say 3";
    let base_text = generate(&model, prompt, &[]);
    let a_text = generate(&model, prompt, &["--adapter", root.join("a").to_str().unwrap()]);
    assert_ne!(a_text, base_text, "the adapter changes the greedy output");

    let adapter = format!("bananas={}", root.join("a").display());
    let server = Server::start(&model, &["--adapter", &adapter, "--adapter-root", root.to_str().unwrap()]);
    let (status, models) = get(&server.url("/v1/models"));
    assert_eq!(status, 200);
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["smollm2-135m-instruct", "bananas"]);
    assert_eq!(models["data"][1]["parent"], "smollm2-135m-instruct");
    assert_eq!(get(&server.url("/v1/models/bananas")).1["parent"], "smollm2-135m-instruct");

    let (status, answer) = complete(&server, "bananas", prompt);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model"], "bananas");
    assert_eq!(answer["choices"][0]["text"], a_text.as_str(), "the served adapter answers as generate --adapter");
    let (status, answer) = complete(&server, "smollm2-135m-instruct", prompt);
    assert_eq!((status, answer["choices"][0]["text"].as_str()), (200, Some(base_text.as_str())), "{answer}");
    let chat = json!({"model": "bananas", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4});
    let (status, answer) = post(&server.url("/v1/chat/completions"), &chat);
    assert_eq!((status, &answer["model"]), (200, &json!("bananas")), "{answer}");
    let (status, answer) = post(&server.url("/v1/messages"), &chat);
    assert_eq!((status, &answer["model"]), (200, &json!("bananas")), "{answer}");

    // A second adapter, trained while the server runs, served without a restart.
    write_data(&root.join("data-b"), "cherry");
    train(&model, &root.join("data-b"), &root.join("b"), "k_proj,down_proj");
    let b_text = generate(&model, prompt, &["--adapter", root.join("b").to_str().unwrap()]);
    let adapters = server.url("/v1/adapters");
    let (status, object) = post(&adapters, &json!({"name": "cherries", "path": "b"}));
    assert_eq!(status, 201, "{object}");
    assert_eq!((&object["id"], &object["object"]), (&json!("cherries"), &json!("model")));
    let (status, answer) = complete(&server, "cherries", prompt);
    assert_eq!((status, answer["choices"][0]["text"].as_str()), (200, Some(b_text.as_str())), "{answer}");
    assert_eq!(get(&adapters).1["data"].as_array().unwrap().len(), 2);

    // Refusals at run time.
    let message = expect_error(post(&adapters, &json!({"name": "cherries", "path": "b"})), 409, Some("name"));
    assert!(message.contains("already served"), "{message}");
    expect_error(post(&adapters, &json!({"name": "smollm2-135m-instruct", "path": "b"})), 409, Some("name"));
    let message = expect_error(post(&adapters, &json!({"name": "x", "path": "missing"})), 400, Some("path"));
    assert!(message.contains("does not exist"), "{message}");
    let message = expect_error(post(&adapters, &json!({"name": "x", "path": "data-a"})), 400, Some("path"));
    assert!(message.contains("not an adapter directory"), "{message}");
    expect_error(post(&adapters, &json!({"name": "x", "path": "/etc"})), 400, Some("path"));
    expect_error(post(&adapters, &json!({"name": "a/b", "path": "b"})), 400, Some("name"));
    expect_error(post(&adapters, &json!({"name": "", "path": "b"})), 400, Some("name"));

    let (status, deleted) = delete(&server.url("/v1/adapters/cherries"));
    assert_eq!((status, &deleted["deleted"]), (200, &json!(true)), "{deleted}");
    let message = expect_error(complete(&server, "cherries", prompt), 404, Some("model"));
    assert!(message.contains("\"bananas\""), "the error lists what is served: {message}");
    expect_error(delete(&server.url("/v1/adapters/cherries")), 404, Some("name"));
    assert_eq!(complete(&server, "bananas", prompt).1["choices"][0]["text"], a_text.as_str(), "the other stays");

    let health = get(&server.url("/health")).1;
    assert!(health["adapters"]["bananas"]["batch"].is_object(), "{health}");
    let metrics = common::agent().get(server.url("/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(metrics.contains("mlxr_model_requests_total{model=\"bananas\"} 4"), "{metrics}");
    assert!(metrics.contains("mlxr_adapters_loaded 1"), "{metrics}");
}

#[test]
fn bad_adapters_are_refused_at_start_with_the_reason() {
    let model = tiny(MODEL);
    let work = tempfile::tempdir().unwrap();
    let gemma = work.path().join("gemma-adapter");
    write_data(&work.path().join("data"), "x");
    train(&tiny("gemma3-tiny"), &work.path().join("data"), &gemma, "q_proj");
    let g = gemma.to_str().unwrap();
    let cases: [(Vec<String>, &str); 5] = [
        (vec![format!("a={g}"), format!("a={g}")], "given to two adapters"),
        (vec![format!("qwen3-tiny={g}")], "base model's id"),
        (vec![format!("={g}")], "must not be empty"),
        (vec!["a=/no/such/adapter".into()], "/no/such/adapter does not exist"),
        (vec![format!("a={g}")], "does not fit"),
    ];
    for (adapters, says) in cases {
        let mut args = vec!["serve".to_owned(), "--model".into(), model.clone(), "--port".into(), "0".into()];
        for a in adapters {
            args.extend(["--adapter".to_owned(), a]);
        }
        let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>(), "");
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says) && stderr.contains("--adapter"), "{args:?}: {stderr}");
    }
    let out = run(&["generate", "--model", &model, "--adapter", &format!("a={g}"), "hi"], "");
    assert!(!out.status.success() && text(&out).1.contains("mlxr serve"), "{}", text(&out).1);

    // Without --adapter-root, clients cannot make the server read a directory.
    let server = Server::start(&model, &[]);
    let answer = post(&server.url("/v1/adapters"), &json!({"name": "a", "path": g}));
    assert_eq!(answer.0, 403, "{}", answer.1);
    assert!(answer.1["error"]["message"].as_str().unwrap().contains("--adapter-root"), "{}", answer.1);
    expect_error(delete(&server.url("/v1/adapters/a")), 404, Some("name"));
    expect_error(complete(&server, "a", "hi"), 404, Some("model"));
}
