// SPDX-License-Identifier: EUPL-1.2
//! The `mlx_lm` bridge's scripts leave nothing in the temporary directory, however `mlxr` ends:
//! `generate` and `chat` stopped by SIGTERM, SIGINT or SIGKILL while they generate, and a server
//! stopped by SIGTERM mid-stream. Each run gets a private `TMPDIR`. Needs `MLXR_PYTHON` (set by
//! `cargo xtask test` to the fixtures virtualenv).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{MODEL, Server, endless_chat, mlxr, tiny};

/// The Python that runs the bridge, or `None` (the test skipped) without `MLXR_PYTHON`.
fn python(test: &str) -> Option<String> {
    let python = std::env::var("MLXR_PYTHON").ok().filter(|p| !p.is_empty());
    if python.is_none() {
        common::skip(test, "MLXR_PYTHON is not set (cargo xtask test sets it to the fixtures virtualenv)");
    }
    python
}

/// What the bridge left in `dir`: the entries named like its script directories.
fn bridge_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("reading the private TMPDIR")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("mlxlm-bridge"))
        .collect()
}

fn kill(pid: u32, signal: &str) {
    let sent = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().expect("running kill");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// Runs `mlxr args...` on the bridge with a private `TMPDIR` and `stdin` as its input, waits for
/// the first bytes of its answer (the bridge is running and generating), sends `signal` and waits
/// for it to end; then returns what the bridge left in that `TMPDIR`.
fn signalled_while_generating(python: &str, args: &[&str], stdin: &str, signal: &str) -> Vec<String> {
    let tmp = tempfile::tempdir().expect("a private TMPDIR");
    let bridge = ["--backend", "mlx_lm", "--python", python, "--model", &tiny(MODEL)];
    let endless = ["--max-tokens", "100000", "--ignore-eos"];
    let mut child = mlxr()
        .args(args)
        .args(bridge)
        .args(endless)
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting mlxr");
    let mut input = child.stdin.take().expect("a piped stdin");
    input.write_all(stdin.as_bytes()).expect("writing mlxr's standard input");
    let mut out = child.stdout.take().expect("a piped stdout");
    let mut first = [0u8; 16];
    let n = out.read(&mut first).expect("reading mlxr's output");
    assert!(n > 0, "mlxr {args:?} ended before it generated anything");
    kill(child.id(), signal);
    drop(out);
    drop(input);
    let status = child.wait().expect("waiting for mlxr");
    assert!(!status.success(), "mlxr {args:?} was stopped by SIG{signal} mid-generation: {status}");
    bridge_dirs(tmp.path())
}

#[test]
fn a_signalled_generate_leaves_no_bridge_directory() {
    let Some(python) = python("a_signalled_generate_leaves_no_bridge_directory") else { return };
    for signal in ["TERM", "INT", "KILL"] {
        let left = signalled_while_generating(&python, &["generate", "hello"], "", signal);
        assert!(left.is_empty(), "after SIG{signal} the bridge left {left:?}");
    }
}

#[test]
fn a_chat_ended_by_sigterm_leaves_no_bridge_directory() {
    let Some(python) = python("a_chat_ended_by_sigterm_leaves_no_bridge_directory") else { return };
    let left = signalled_while_generating(&python, &["chat"], "hello\n", "TERM");
    assert!(left.is_empty(), "after SIGTERM the bridge left {left:?}");
}

#[test]
fn a_server_stopped_mid_stream_leaves_no_bridge_directory() {
    let Some(python) = python("a_server_stopped_mid_stream_leaves_no_bridge_directory") else { return };
    let tmp = tempfile::tempdir().expect("a private TMPDIR");
    let args = ["--backend", "mlx_lm", "--python", &python, "--max-tokens-limit", "100000"];
    let server = Server::start_with_env(&tiny(MODEL), &args, &[("TMPDIR", tmp.path().to_str().expect("UTF-8"))]);
    let events = endless_chat(&server);
    let (code, stderr) = server.stop(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    drop(events);
    let left = bridge_dirs(tmp.path());
    assert!(left.is_empty(), "after SIGTERM the server's bridge left {left:?}");
}

/// The tests above mean something only if the bridge's scripts go to `TMPDIR`: one that cannot
/// be written stops the start, naming it.
#[test]
fn the_bridge_scripts_go_to_tmpdir() {
    let Some(python) = python("the_bridge_scripts_go_to_tmpdir") else { return };
    let tmp = tempfile::tempdir().expect("a private TMPDIR");
    let missing = tmp.path().join("missing");
    let out = mlxr()
        .args(["generate", "--backend", "mlx_lm", "--python", &python, "--model", &tiny(MODEL), "hello"])
        .env("TMPDIR", &missing)
        .output()
        .expect("running mlxr");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}
