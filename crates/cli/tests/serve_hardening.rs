// SPDX-License-Identifier: EUPL-1.2
//! `mlxr serve` when things go wrong inside it: a panic in the engine fails the generations it
//! held and the server goes on; a dead engine or a dead mlx-lm bridge process makes `/health`
//! fail and the server exit with an error, so that a supervisor can start it again.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
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
    // A job (the request's start) panics, then a scheduler step. The fail points fire at the
    // engine's first job and step: no warm-up, so that those are the requests'.
    let server =
        Server::start_with_env(&tiny(MODEL), &["--no-warmup"], &[("MLXR_FAILPOINTS", "engine.job,engine.step")]);
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
    let server = Server::start_with_env(&tiny(MODEL), &["--no-warmup"], &[("MLXR_FAILPOINTS", "engine.exit")]);
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

/// Reads what the server sends on `stream` until it closes the connection (within `within`).
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> String {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => String::from_utf8_lossy(&got).into_owned(),
        Err(e) => panic!("the server kept the connection open for {within:?} ({e}); it sent {got:?}"),
    }
}

fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://")).expect("connecting to the server")
}

#[test]
fn slow_and_idle_clients_are_cut_off() {
    let limits = ["--header-timeout", "0.5", "--body-timeout", "0.5"];
    let server = Server::start(&tiny(MODEL), &limits);
    // Connected and silent; a head that never ends; a keep-alive connection left idle.
    let mut silent = connect(&server);
    let mut partial = connect(&server);
    partial.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let mut idle = connect(&server);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    for (what, stream) in [("silent", &mut silent), ("partial head", &mut partial)] {
        let sent = read_until_closed(stream, Duration::from_secs(10));
        assert!(!sent.contains("200 OK"), "{what}: {sent}");
    }
    let sent = read_until_closed(&mut idle, Duration::from_secs(10));
    assert!(sent.starts_with("HTTP/1.1 200 OK"), "the request was answered before the idle connection closed: {sent}");
    // A body that stops half-way is answered 408.
    let mut slow = connect(&server);
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n\
                content-length: 100\r\n\r\n{\"messages\":";
    slow.write_all(head.as_bytes()).unwrap();
    let sent = read_until_closed(&mut slow, Duration::from_secs(10));
    assert!(sent.starts_with("HTTP/1.1 408 Request Timeout"), "{sent}");
    assert!(sent.contains("the request body did not arrive within 0.5 s"), "{sent}");
    // And the server still serves.
    assert_eq!(post(&server.url("/v1/chat/completions"), &chat_body(2)).0, 200);
}

#[test]
fn connections_over_the_limit_get_503() {
    let server = Server::start(&tiny(MODEL), &["--max-connections", "2"]);
    let held: Vec<TcpStream> = (0..2).map(|_| connect(&server)).collect();
    let mut third = connect(&server);
    let sent = read_until_closed(&mut third, Duration::from_secs(10));
    assert!(sent.starts_with("HTTP/1.1 503 Service Unavailable"), "{sent}");
    assert!(sent.contains("the server has 2 connections open, its limit; try again later"), "{sent}");
    drop(held);
    // Once they close, a client is served again (the server notices the closes at once).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match health_status(&server) {
            Some(200) => break,
            other => assert!(Instant::now() < deadline, "still refused: {other:?}"),
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

#[test]
fn a_prompt_too_long_is_refused_without_waiting_for_a_generation_slot() {
    // One slot, held by an endless generation; a queue that would give up after a minute.
    let args = ["--max-concurrent", "1", "--queue-timeout", "60", "--max-tokens-limit", "100000"];
    let server = Server::start(&tiny(MODEL), &args);
    let held = common::endless_chat(&server);
    let started = Instant::now();
    let long = serde_json::json!({"prompt": "word ".repeat(300), "max_tokens": 2});
    let msg = common::expect_error(post(&server.url("/v1/completions"), &long), 400, Some("prompt"));
    assert!(msg.contains("longer than the context length of 128 tokens"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(30), "refused at once, not after waiting in the queue");
    assert_eq!(server.engine_stats()["queued"], 0, "it never queued");
    drop(held);
}
