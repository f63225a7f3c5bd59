// SPDX-License-Identifier: EUPL-1.2
//! `mlxr serve` when things go wrong inside it: a panic in the engine fails the generations it
//! held and the server goes on; a dead engine or a dead mlx-lm bridge process makes `/health`
//! fail and the server exit with an error, so that a supervisor can start it again.

mod common;

use std::time::{Duration, Instant};

use common::{MODEL, Server, chat_body, get, post, tiny};

/// `/health` of a server whose model may have died: its status, or `None` once nobody answers.
fn health_status(server: &Server) -> Option<u16> {
    common::agent().get(&server.url("/health")).call().ok().map(|r| r.status().as_u16())
}

/// Polls `/health` until it is no longer 200 (`Some(503)`) or the server is gone (`None`).
fn health_after_death(server: &Server) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match health_status(server) {
            Some(200) => {}
            other => return other,
        }
        assert!(Instant::now() < deadline, "/health still says ok 20 s after the model died");
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

#[test]
fn a_panic_in_the_engine_fails_its_generations_and_the_server_goes_on() {
    // A job (the request's start) panics, then a scheduler step.
    let server = Server::start_with_env(&tiny(MODEL), &[], &[("MLXR_FAILPOINTS", "engine.job,engine.step")]);
    let chat = server.url("/v1/chat/completions");
    for _ in 0..2 {
        let (status, answer) = post(&chat, &chat_body(4));
        assert_eq!(status, 500, "{answer}");
    }
    // The next request is served as if nothing had happened.
    let (status, answer) = post(&chat, &chat_body(4));
    assert_eq!(status, 200, "{answer}");
    let (status, health) = get(&server.url("/health"));
    assert_eq!((status, &health["status"]), (200, &serde_json::json!("ok")), "{health}");
    assert_eq!(health["engine"]["batch"]["caught_panics"], 2, "{health}");
    let metrics = common::agent().get(&server.url("/metrics")).call().unwrap().into_body().read_to_string().unwrap();
    assert!(metrics.contains("\nmlxr_engine_caught_panics_total 2\n"), "{metrics}");
    let (code, stderr) = server.stop(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("the engine caught a panic"), "{stderr}");
    assert!(stderr.contains("the engine failed (step: fail point engine.step)"), "the request's error: {stderr}");
    assert!(stderr.contains("panic=fail point engine.job"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "no colour codes in a log that is not a terminal: {stderr}");
}

#[test]
fn a_dead_engine_fails_health_and_the_server_exits_with_an_error() {
    let server = Server::start_with_env(&tiny(MODEL), &[], &[("MLXR_FAILPOINTS", "engine.exit")]);
    let (status, answer) = post(&server.url("/v1/chat/completions"), &chat_body(4));
    assert_eq!(status, 500, "{answer}");
    // 503 while it stops (or already gone: the check runs every second).
    assert!(matches!(health_after_death(&server), Some(503) | None));
    let (code, stderr) = server.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("the model can no longer serve: backend \"metal\": the engine thread has stopped"),
        "{stderr}"
    );
}

/// The process ids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("reading /proc");
    let mut ids = Vec::new();
    for task in tasks.flatten() {
        let listed = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        ids.extend(listed.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    ids
}

#[test]
fn a_dead_bridge_process_fails_health_and_the_server_exits_with_an_error() {
    let test = "a_dead_bridge_process_fails_health_and_the_server_exits_with_an_error";
    let Some(python) = std::env::var("MLXR_PYTHON").ok().filter(|p| !p.is_empty()) else {
        common::skip(test, "MLXR_PYTHON is not set (cargo xtask test sets it to the fixtures virtualenv)");
        return;
    };
    let server = Server::start(&tiny(MODEL), &["--backend", "mlx_lm", "--python", &python]);
    assert_eq!(post(&server.url("/v1/chat/completions"), &chat_body(2)).0, 200);
    let bridge = children(server.pid());
    assert_eq!(bridge.len(), 1, "one bridge process: {bridge:?}");
    let killed = std::process::Command::new("kill").args(["-KILL", &bridge[0].to_string()]).status().unwrap();
    assert!(killed.success());
    assert!(matches!(health_after_death(&server), Some(503) | None));
    let (code, stderr) = server.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("the model can no longer serve: "), "{stderr}");
    assert!(stderr.contains("the bridge process exited (signal: 9"), "{stderr}");
}
