// SPDX-License-Identifier: EUPL-1.2
//! `mlxr lora` and `mlxr fuse` end to end on a tiny fixture: train an adapter, generate with it,
//! fuse it, and the fused model generates the same; bad data is refused with its line.

mod common;

use std::path::Path;

use common::{run, text, tiny};

fn write_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let train: String =
        (0..8).map(|i| format!("{{\"prompt\": \"Say {i}\", \"completion\": \" number {i} is here\"}}\n")).collect();
    std::fs::write(dir.join("train.jsonl"), train).unwrap();
    let valid =
        "{\"prompt\": \"Say 3\", \"completion\": \" number 3\"}\n{\"prompt\": \"Say 5\", \"completion\": \" 5\"}\n";
    std::fs::write(dir.join("valid.jsonl"), valid).unwrap();
}

#[test]
fn lora_trains_an_adapter_that_generate_and_fuse_use() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    write_data(&data);
    let adapters = work.path().join("adapters");
    let model = tiny("llama-tiny");
    let (a, d) = (adapters.to_str().unwrap(), data.to_str().unwrap());
    let out = run(
        &[
            "lora",
            "--model",
            &model,
            "--data",
            d,
            "--adapter-path",
            a,
            "--iters",
            "6",
            "--batch-size",
            "2",
            "--learning-rate",
            "1e-2",
            "--rank",
            "4",
            "--targets",
            "q_proj,v_proj,down_proj",
            "--steps-per-eval",
            "3",
            "--save-every",
            "3",
            "--mask-prompt",
            "--json",
        ],
        "",
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let events: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let losses: Vec<f64> =
        events.iter().filter(|e| e["event"] == "train").map(|e| e["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 6, "{stdout}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(events.iter().any(|e| e["event"] == "eval"), "{stdout}");
    assert!(events.iter().any(|e| e["event"] == "saved"), "{stdout}");
    assert!(adapters.join("adapters.safetensors").is_file() && adapters.join("adapter_config.json").is_file());

    // The adapter changes the model's output; the fused model gives the adapter's output.
    let base = ["generate", "--model", &model, "--max-tokens", "8", "Say 3"];
    let plain = run(&base, "");
    let adapted = run(&[&base[..], &["--adapter", a]].concat(), "");
    assert!(plain.status.success() && adapted.status.success(), "{:?}", text(&adapted));
    let fused = work.path().join("fused");
    let f = fused.to_str().unwrap();
    let out = run(&["fuse", "--model", &model, "--adapter-path", a, "--save-path", f], "");
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).1.contains(&format!("layers into {f}")), "{:?}", text(&out));
    let from_fused = run(&["generate", "--model", f, "--max-tokens", "8", "Say 3"], "");
    assert!(from_fused.status.success(), "{:?}", text(&from_fused));
    assert_eq!(text(&from_fused).0, text(&adapted).0, "fused model = base + adapter");
    assert_ne!(text(&plain).0, text(&adapted).0, "training changed the output");
}

#[test]
fn lora_refuses_bad_data_and_settings_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("train.jsonl"), "{\"text\": \"fine\"}\n{not json}\n").unwrap();
    let model = tiny("llama-tiny");
    let d = data.to_str().unwrap();
    let a = work.path().join("a");
    let out = run(&["lora", "--model", &model, "--data", d, "--adapter-path", a.to_str().unwrap(), "--iters", "2"], "");
    assert!(!out.status.success());
    let err = text(&out).1;
    assert!(err.contains("train.jsonl") && err.contains('2'), "names the file and line: {err}");
    let out = run(&["lora", "--model", &model, "--data", d, "--rank", "0"], "");
    assert!(!out.status.success());
    assert!(text(&out).1.contains("rank"), "{:?}", text(&out));
    let out = run(&["lora", "--model", &model, "--data", d, "--lora-dtype", "f16"], "");
    assert!(text(&out).1.contains("--lora-dtype"), "{:?}", text(&out));
    let out = run(&["fuse", "--model", &model, "--adapter-path", "/no/adapter", "--save-path", "/tmp/x"], "");
    assert!(!out.status.success());
    assert!(text(&out).1.contains("/no/adapter"), "{:?}", text(&out));
}
