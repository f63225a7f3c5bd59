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

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// `mlxr lora` on the tiny Llama with `data` into `adapters`, three iterations and `extra` flags.
fn lora(model: &str, data: &Path, adapters: &Path, extra: &[&str]) -> std::process::Output {
    let (a, d) = (adapters.to_str().unwrap(), data.to_str().unwrap());
    let base = [
        "lora",
        "--model",
        model,
        "--data",
        d,
        "--adapter-path",
        a,
        "--batch-size",
        "2",
        "--learning-rate",
        "1e-2",
        "--steps-per-eval",
        "0",
        "--save-every",
        "3",
        "--json",
    ];
    run(&[&base[..], extra].concat(), "")
}

#[test]
fn lora_refuses_an_adapter_path_in_use_and_resumes_with_the_saved_shape() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    write_data(&data);
    let adapters = work.path().join("adapters");
    let model = tiny("llama-tiny");
    let out = lora(
        &model,
        &data,
        &adapters,
        &["--iters", "3", "--rank", "4", "--alpha", "8", "--targets", "q_proj,down_proj"],
    );
    assert!(out.status.success(), "{}", text(&out).1);
    let before = snapshot(&adapters);

    // Again without --resume (another rank, as when the earlier run is forgotten): refused, nothing touched.
    let out = lora(&model, &data, &adapters, &["--iters", "3", "--rank", "8"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out).1;
    assert!(err.contains(adapters.to_str().unwrap()) && err.contains("--resume"), "{err}");
    assert!(err.contains("adapter_config.json"), "names what is there: {err}");
    assert_eq!(snapshot(&adapters), before);

    // --resume with a rank that contradicts the saved one: refused with both values, nothing touched.
    let out = lora(&model, &data, &adapters, &["--iters", "6", "--resume", "--rank", "8"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out).1;
    assert!(err.contains("lora.rank") && err.contains("--rank 8") && err.contains("rank 4"), "{err}");
    assert_eq!(snapshot(&adapters), before);
    let out = lora(&model, &data, &adapters, &["--iters", "6", "--resume", "--targets", "q_proj"]);
    let err = text(&out).1;
    assert!(!out.status.success() && err.contains("lora.target_keys") && err.contains("mlp.down_proj"), "{err}");

    // --resume alone takes rank, alpha and targets from the adapter and goes on from iteration 3.
    let out = lora(&model, &data, &adapters, &["--iters", "6", "--resume"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let events: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events[0]["event"], "resumed", "{stdout}");
    assert_eq!(events[0]["iteration"], 3);
    assert_eq!(events[1]["event"], "start");
    assert_eq!(events[1]["start"], 3);
    let iterations: Vec<u64> =
        events.iter().filter(|e| e["event"] == "train").map(|e| e["iteration"].as_u64().unwrap()).collect();
    assert_eq!(iterations, [4, 5, 6]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapters.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["lora_parameters"]["rank"], 4);
    assert_eq!(cfg["lora_parameters"]["scale"], 2.0);
    assert_eq!(cfg["lora_parameters"]["keys"], serde_json::json!(["mlp.down_proj", "self_attn.q_proj"]));
    assert!(adapters.join("0000006_adapters.safetensors").is_file());
}

#[test]
fn fuse_replaces_an_occupied_directory_only_with_force_and_the_result_loads() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    write_data(&data);
    // The base model, carrying a stamp of its own files that must not follow the fused model.
    let base = work.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for name in names(Path::new(&tiny("llama-tiny"))) {
        std::fs::copy(Path::new(&tiny("llama-tiny")).join(&name), base.join(&name)).unwrap();
    }
    std::fs::write(base.join(".mlxr-stamp.json"), "{\"sha256\": \"of the base\"}").unwrap();
    let model = base.to_str().unwrap();
    let adapters = work.path().join("adapters");
    let out = lora(model, &data, &adapters, &["--iters", "4", "--rank", "4", "--targets", "q_proj,v_proj,down_proj"]);
    assert!(out.status.success(), "{}", text(&out).1);

    // The save path holds another model: sharded (an index and a shard), its config, its stamp.
    let fused = work.path().join("fused");
    std::fs::create_dir(&fused).unwrap();
    std::fs::copy(Path::new(&tiny("qwen3-tiny")).join("config.json"), fused.join("config.json")).unwrap();
    let index = r#"{"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}"#;
    std::fs::write(fused.join("model.safetensors.index.json"), index).unwrap();
    std::fs::write(fused.join("model-00002-of-00002.safetensors"), "stale shard").unwrap();
    std::fs::write(fused.join(".mlxr-stamp.json"), "{}").unwrap();
    let before = snapshot(&fused);
    let (a, f) = (adapters.to_str().unwrap(), fused.to_str().unwrap());
    let args = ["fuse", "--model", model, "--adapter-path", a, "--save-path", f];
    let refused = run(&args, "");
    assert_eq!(refused.status.code(), Some(1));
    let err = text(&refused).1;
    assert!(err.contains(f) && err.contains("--force") && err.contains("model.safetensors.index.json"), "{err}");
    assert_eq!(snapshot(&fused), before, "a refused fuse touches nothing");

    // --force never replaces the adapter or model directory.
    for dir in [a, model] {
        let out = run(&["fuse", "--model", model, "--adapter-path", a, "--save-path", dir, "--force"], "");
        assert!(!out.status.success() && text(&out).1.contains("elsewhere"), "{:?}", text(&out));
    }
    assert!(adapters.join("adapters.safetensors").is_file() && base.join("model.safetensors").is_file());

    let forced = run(&[&args[..], &["--force"]].concat(), "");
    assert!(forced.status.success(), "{:?}", text(&forced));
    assert_eq!(
        names(&fused),
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
        "the fused model and nothing stale"
    );
    assert_eq!(std::fs::read(fused.join("config.json")).unwrap(), std::fs::read(base.join("config.json")).unwrap());
    assert_eq!(names(work.path()), ["adapters", "base", "data", "fused"], "nothing staged is left beside it");

    // It loads with the default backend and generates what base + adapter generate.
    let prompt = ["--max-tokens", "8", "Say 3"];
    let from_fused = run(&[&["generate", "--model", f][..], &prompt].concat(), "");
    let adapted = run(&[&["generate", "--model", model, "--adapter", a][..], &prompt].concat(), "");
    assert!(from_fused.status.success(), "{:?}", text(&from_fused));
    assert!(adapted.status.success(), "{:?}", text(&adapted));
    assert_eq!(text(&from_fused).0, text(&adapted).0, "fused model = base + adapter");
}
