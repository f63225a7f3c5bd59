// SPDX-License-Identifier: EUPL-1.2
//! Helpers shared by the end-to-end tests: the built binary, the fixture models, a server
//! started on a free port, and an HTTP client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The `mlxr` binary under test.
pub(crate) fn mlxr() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mlxr"));
    c.env_remove("RUST_LOG");
    c
}

/// Starts `command` with `stdin` as its standard input and its output and errors piped; `what`
/// says what failed to start.
fn spawn_piped(command: &mut Command, stdin: Stdio, what: &str) -> Child {
    command.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect(what)
}

/// Runs `mlxr args...` with `stdin` as standard input.
pub(crate) fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = spawn_piped(mlxr().args(args), Stdio::piped(), "starting mlxr");
    let mut input = child.stdin.take().expect("a piped stdin");
    input.write_all(stdin.as_bytes()).expect("writing mlxr's standard input");
    drop(input);
    child.wait_with_output().expect("waiting for mlxr")
}

/// Standard output and error as text.
pub(crate) fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A tiny fixture model (`testdata/models/<name>`): random weights, deterministic gibberish.
pub(crate) fn tiny(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models").join(name);
    p.to_str().expect("a UTF-8 path").to_owned()
}

fn require_real() -> bool {
    std::env::var("MLXR_REQUIRE_REAL_MODELS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Prints why a test is skipped, or fails it when `MLXR_REQUIRE_REAL_MODELS=1`.
pub(crate) fn skip(test: &str, why: &str) {
    assert!(!require_real(), "MLXR_REQUIRE_REAL_MODELS=1 but {why}");
    eprintln!("note: {test} skipped: {why} (set MLXR_REQUIRE_REAL_MODELS=1 to make this an error)");
}

/// The real SmolLM2 135M Instruct that `cargo xtask fixtures` converts, where the parity crate
/// looks for it: `MLXR_MODELS_DIR`, else `MLXR_CACHE_DIR/models`, else `~/.cache/mlxr/models`.
pub(crate) fn smollm2(test: &str) -> Option<String> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = var("MLXR_MODELS_DIR")
        .or_else(|| var("MLXR_CACHE_DIR").map(|c| c.join("models")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("mlxr/models")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/mlxr/models")));
    let dir = base.map(|b| b.join("smollm2-135m-instruct"));
    match dir {
        Some(d) if d.join("config.json").is_file() => Some(d.to_str().expect("a UTF-8 path").to_owned()),
        Some(d) => {
            skip(test, &format!("{} is missing (run `cargo xtask fixtures`)", d.display()));
            None
        }
        None => {
            skip(test, "no models directory (set MLXR_MODELS_DIR or HOME)");
            None
        }
    }
}

/// A running `mlxr serve`, killed when dropped.
pub(crate) struct Server {
    child: Child,
    pub(crate) base: String,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    /// Starts `mlxr serve --port 0 extra...` and waits for its address.
    pub(crate) fn start(model: &str, extra: &[&str]) -> Server {
        Server::start_with_env(model, extra, &[])
    }

    /// [`Server::start`] with variables added to its environment.
    pub(crate) fn start_with_env(model: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let serve = ["serve", "--model", model, "--port", "0"];
        let mut command = mlxr();
        command.args(serve).args(extra).envs(env.iter().copied());
        let mut child = spawn_piped(&mut command, Stdio::null(), "starting mlxr serve");
        let mut err = child.stderr.take().expect("a piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        let mut out = BufReader::new(child.stdout.take().expect("a piped stdout"));
        let mut line = String::new();
        let n = out.read_line(&mut line).expect("reading the server's first line");
        let mut server = Server { child, base: String::new(), stderr: Some(stderr) };
        if n == 0 {
            let _ = server.child.wait();
            panic!("mlxr serve exited before listening; stderr:\n{}", server.stderr_text());
        }
        let addr =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        server.base = addr.to_owned();
        server
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The server process's id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (on Unix) and waits for a clean exit within `within`.
    pub(crate) fn stop(self, within: Duration) -> (Option<i32>, String) {
        #[cfg(unix)]
        {
            let pid = self.child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
        }
        self.wait_exit(within)
    }

    /// Waits for the server to exit by itself within `within`: its exit code and standard error.
    pub(crate) fn wait_exit(mut self, within: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status.code(), self.stderr_text());
            }
            assert!(Instant::now() < deadline, "the server did not stop within {within:?}");
            std::thread::yield_now();
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    fn stderr_text(&mut self) -> String {
        self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }

    /// `/health`'s engine counters.
    pub(crate) fn engine_stats(&self) -> Value {
        let (status, body) = get(&self.url("/health"));
        assert_eq!(status, 200, "{body}");
        body["engine"].clone()
    }

    /// Polls `/health` until `done(engine counters)` or the deadline.
    pub(crate) fn wait_for(&self, what: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let stats = self.engine_stats();
            if done(&stats) {
                return stats;
            }
            assert!(Instant::now() < deadline, "{what}: not within {within:?}; last counters {stats}");
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client that returns 4xx and 5xx answers instead of failing on them.
pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(180)))
        .build()
        .into()
}

/// GET, with the status and the JSON body.
pub(crate) fn get(url: &str) -> (u16, Value) {
    let mut r = agent().get(url).call().expect("a GET");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().expect("the body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}")))
}

/// POST of a raw body, with the status and the JSON body.
pub(crate) fn post_raw(url: &str, body: &str) -> (u16, Value) {
    let mut r = agent().post(url).header("content-type", "application/json").send(body).expect("a POST");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().expect("the body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}")))
}

/// POST of a JSON value.
pub(crate) fn post(url: &str, body: &Value) -> (u16, Value) {
    post_raw(url, &body.to_string())
}

/// A streaming POST: the status, and the `data:` payloads of the events as they arrive.
pub(crate) fn post_stream(url: &str, body: &Value) -> (u16, impl Iterator<Item = String> + use<>) {
    let r = agent().post(url).header("content-type", "application/json").send(body.to_string()).expect("a POST");
    let status = r.status().as_u16();
    let lines = BufReader::new(r.into_body().into_reader()).lines();
    let data = lines.map_while(Result::ok).filter_map(|l| l.strip_prefix("data: ").map(str::to_owned));
    (status, data)
}

/// Starts a streamed chat that would go on for 100,000 tokens (the server needs
/// `--max-tokens-limit 100000`) and returns its events once three chunks have arrived.
pub(crate) fn endless_chat(server: &Server) -> impl Iterator<Item = String> + use<> {
    let body = json!({
        "messages": [{"role": "user", "content": "go on forever"}],
        "max_tokens": 100000, "ignore_eos": true, "stream": true
    });
    let (status, mut events) = post_stream(&server.url("/v1/chat/completions"), &body);
    assert_eq!(status, 200);
    for _ in 0..3 {
        assert!(events.next().is_some(), "chunks arrive");
    }
    events
}

/// The text of a stream's chunks (chat deltas or completion texts) and its parsed chunks.
pub(crate) fn read_stream(events: impl Iterator<Item = String>) -> (String, Vec<Value>, bool) {
    let mut text = String::new();
    let mut chunks = Vec::new();
    let mut done = false;
    for data in events {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("not JSON ({e}): {data}"));
        if let Some(choice) = chunk["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().or(choice["text"].as_str()).unwrap_or(""));
        }
        chunks.push(chunk);
    }
    (text, chunks, done)
}

/// The tiny model the server tests serve.
pub(crate) const MODEL: &str = "qwen3-tiny";

/// A one-message chat request for `MODEL`.
pub(crate) fn chat_body(max_tokens: u64) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens})
}

/// Asserts an OpenAI-shaped error with this status and param, and returns its message.
pub(crate) fn expect_error(answer: (u16, Value), status: u16, param: Option<&str>) -> String {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    let error = &body["error"];
    assert_eq!(error["param"].as_str(), param, "{body}");
    assert!(error["type"].is_string() && error["code"].is_string(), "{body}");
    error["message"].as_str().expect("a message").to_owned()
}
