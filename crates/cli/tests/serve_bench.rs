// SPDX-License-Identifier: EUPL-1.2
//! The serving benchmark's driver (`xtask/bench/serve_bench.py`) end to end, without mlx-lm: it
//! starts the built `mlxr serve` on a tiny fixture model, drives 1 and 2 concurrent streaming
//! clients through it, stops it, and writes a report whose figures make sense.

mod common;

use std::path::Path;
use std::process::Command;

use common::tiny;
use serde_json::Value;

fn driver() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../xtask/bench/serve_bench.py")
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
    x
}

#[test]
fn the_driver_measures_our_server_end_to_end() {
    if let Err(e) = Command::new("python3").arg("--version").output() {
        eprintln!("note: the_driver_measures_our_server_end_to_end skipped: cannot run python3: {e}");
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let json = dir.path().join("report.json");
    let logs = dir.path().join("logs");
    let out = Command::new("python3")
        .arg(driver())
        .args(["--mlxr-bin", env!("CARGO_BIN_EXE_mlxr"), "--model", &tiny("llama-tiny"), "--skip-mlxlm"])
        .args(["--clients", "1,2", "--max-tokens", "4", "--rounds", "2", "--warmup", "1"])
        .args(["--start-timeout", "120", "--request-timeout", "120", "--markdown"])
        // Passed on to `mlxr serve`; the driver then leaves out its own --max-concurrent.
        .args(["--ours-args", "--max-concurrent 2 --model-id bench-tiny"])
        .arg("--json")
        .arg(&json)
        .arg("--log-dir")
        .arg(&logs)
        .env_remove("RUST_LOG")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("running serve_bench.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "serve_bench.py failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("aggregate tok/s") && stdout.contains("TTFT p95 ms"), "no table:\n{stdout}");
    assert!(stdout.contains("| clients |"), "no Markdown table:\n{stdout}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("the report")).expect("JSON");
    assert_eq!(report["schema"], "mlxr-serve-bench/1");
    assert_eq!(report["model"]["name"], "llama-tiny");
    assert_eq!(report["settings"]["max_tokens"], 4);
    assert!(report["host"]["cpu_count"].as_u64().is_some_and(|n| n >= 1), "{}", report["host"]);
    let servers = report["servers"].as_object().expect("servers");
    assert_eq!(servers.keys().collect::<Vec<_>>(), ["ours"], "only our server ran");
    assert_eq!(report["comparison"], serde_json::json!([]), "nothing to compare without mlx-lm");

    let ours = &servers["ours"];
    assert!(ours["version"].as_str().is_some_and(|v| v.starts_with("mlxr ")), "{}", ours["version"]);
    assert_eq!(ours["token_count"], "usage", "mlxr serve sends the usage block");
    let command: Vec<&str> = ours["command"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(command.iter().filter(|a| **a == "--max-concurrent").count(), 1, "{command:?}");
    assert!(command.windows(2).any(|w| w == ["--max-concurrent", "2"]), "--ours-args reached the server: {command:?}");
    assert!(command.contains(&"--max-queue"), "{command:?}");

    let levels = ours["levels"].as_array().expect("levels");
    assert_eq!(levels.iter().map(|l| l["clients"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    let mut prompts = Vec::new();
    for level in levels {
        let clients = level["clients"].as_u64().unwrap();
        let what = format!("{clients} clients");
        assert_eq!(level["errors"], 0, "{what}: {}", level["error_messages"]);
        assert_eq!(level["requests"].as_u64(), Some(clients * 2), "{what}: two rounds");
        let tokens = level["tokens"].as_u64().unwrap();
        assert!(tokens > 0 && tokens <= clients * 2 * 4, "{what}: {tokens} tokens");
        positive(&level["wall_s"], &format!("{what}: wall_s"));
        positive(&level["aggregate_tok_s"], &format!("{what}: aggregate_tok_s"));
        let p50 = positive(&level["ttft_s"]["p50"], &format!("{what}: TTFT p50"));
        let p95 = positive(&level["ttft_s"]["p95"], &format!("{what}: TTFT p95"));
        assert!(p50 <= p95, "{what}: p50 {p50} > p95 {p95}");
        for r in level["requests_detail"].as_array().unwrap() {
            assert!(r["error"].is_null(), "{r}");
            let ttft = positive(&r["ttft_s"], "a request's TTFT");
            assert!(r["end_s"].as_f64().unwrap() >= ttft, "{r}");
            assert!((1..=4).contains(&r["tokens"].as_u64().unwrap()), "{r}");
            assert!(r["prompt_tokens"].as_u64().unwrap() > 5, "{r}");
            prompts.push(r["prompt"].as_u64().unwrap());
        }
    }
    let n = prompts.len();
    prompts.sort_unstable();
    prompts.dedup();
    assert_eq!(prompts.len(), n, "every request had its own prompt");

    let log = std::fs::read_to_string(logs.join("ours.log")).expect("the server's log");
    assert!(log.contains("shutting down"), "the driver stops the server with SIGTERM:\n{log}");
}
