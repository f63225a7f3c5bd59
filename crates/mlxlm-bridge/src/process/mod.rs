// SPDX-License-Identifier: EUPL-1.2
//! The bridge process: spawning it, one request-and-reply exchange at a time, and the crash
//! boundary around all of it. The script it runs is in `script`, the threads that read its stdout
//! and drain its stderr in `pipes`, and the errors it reports in `errors`.

mod errors;
#[cfg(test)]
mod fuzz_tests;
mod pipes;
mod script;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::{ChildStdin, Command as OsCommand, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, sync_channel};
use std::time::{Duration, Instant};

use inference_core::{CancelToken, Error, Result, Stopped, Token};

pub use errors::PythonTraceback;
use errors::backend_error;
pub(crate) use errors::bridge_error;
pub(crate) use pipes::{ChildHandle, StderrTail};
use pipes::{Incoming, spawn_threads};
pub(crate) use script::Script;
pub use script::{BRIDGE_FILES, BRIDGE_SOURCE};

use crate::BACKEND_NAME;
use crate::protocol::{Command, Event, PROTOCOL_VERSION, Request};
use crate::python::CHILD_ENV;

/// The longest line accepted from the bridge, in bytes.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// How much of the bridge's stderr is kept (the most recent bytes).
pub const STDERR_TAIL_BYTES: usize = 64 * 1024;

/// How often a wait for the bridge looks at the caller's cancel token.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// How long the bridge has to exit after `quit`, or after its stdout closed, before it is killed
/// (at most the process's time limit).
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Events buffered between the stdout reader and the exchange; beyond this the reader waits, so
/// a stalled consumer holds the bridge up instead of growing a queue.
const EVENT_BUFFER: usize = 256;

/// What the bridge reported when it started.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BridgeVersions {
    /// The protocol version it speaks (always [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) for a
    /// bridge that got as far as a model).
    pub protocol: u32,
    /// The mlx-lm version (`mlx_lm.__version__`).
    pub mlx_lm: String,
    /// The MLX version (`mlx.core.__version__`).
    pub mlx: String,
    /// The Python version.
    pub python: String,
    /// The interpreter that runs the bridge.
    pub interpreter: PathBuf,
}

/// How to start a bridge process.
#[derive(Debug, Clone)]
pub(crate) struct Spawn {
    pub(crate) python: PathBuf,
    pub(crate) script: Script,
    /// For the start-up handshake, load and info, and for a cancelled request to finish.
    pub(crate) timeout: Duration,
}

/// How one exchange waits: for a cancel token, a time limit, and what to do with tokens.
pub(crate) struct Control<'a> {
    pub(crate) cancel: Option<&'a CancelToken>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) on_token: Option<&'a mut dyn FnMut(Token) -> Result<(), Stopped>>,
}

impl<'a> Control<'a> {
    /// Wait at most `timeout` for the reply.
    pub(crate) fn timeout(timeout: Duration) -> Self {
        Self { cancel: None, timeout: Some(timeout), on_token: None }
    }

    /// Wait as long as it takes, unless `cancel` is cancelled.
    pub(crate) fn cancellable(cancel: &'a CancelToken) -> Self {
        Self { cancel: Some(cancel), timeout: None, on_token: None }
    }
}

/// A running bridge. Killed (and reaped) on drop.
#[derive(Debug)]
pub(crate) struct Process {
    handle: Arc<ChildHandle>,
    stdin: Option<ChildStdin>,
    events: Receiver<Incoming>,
    stderr: Arc<StderrTail>,
    pid: u32,
    next_id: u64,
    timeout: Duration,
    dead: Option<String>,
    versions: BridgeVersions,
}

impl Process {
    /// Starts the bridge and waits for its `ready` event.
    pub(crate) fn start(spawn: &Spawn) -> Result<Process> {
        // The script's directory lives for the start only: the bridge removes it once it has
        // imported its modules, and it is dropped (removed if still there) when this returns.
        let script = spawn.script.materialise()?;
        let python = &spawn.python;
        let mut child = OsCommand::new(python)
            .arg("-u")
            .arg("-B")
            .arg(&script.path)
            .envs(CHILD_ENV.iter().copied())
            .envs(script.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| {
                Error::backend_with_source(
                    BACKEND_NAME,
                    format!("cannot start the Python interpreter {}", python.display()),
                    err,
                )
            })?;
        let pid = child.id();
        let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let handle = Arc::new(ChildHandle::new(child));
        let tail = Arc::new(StderrTail::default());
        let (tx, events) = sync_channel(EVENT_BUFFER);
        let threads = match (stdout, stderr) {
            (Some(stdout), Some(stderr)) => spawn_threads(stdout, stderr, tx, Arc::clone(&tail)),
            _ => Err(io::Error::other("the child's pipes are missing")),
        };
        if let Err(err) = threads {
            handle.kill();
            return Err(Error::backend_with_source(BACKEND_NAME, "cannot start the bridge's reader threads", err));
        }
        let mut process = Process {
            handle,
            stdin,
            events,
            stderr: tail,
            pid,
            next_id: 1,
            timeout: spawn.timeout,
            dead: None,
            versions: BridgeVersions { interpreter: python.clone(), ..BridgeVersions::default() },
        };
        process.handshake()?;
        drop(script);
        Ok(process)
    }

    fn handshake(&mut self) -> Result<()> {
        const OP: &str = "start-up";
        let deadline = Instant::now() + self.timeout;
        let incoming = match self.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(incoming) => incoming,
            Err(RecvTimeoutError::Disconnected) => Incoming::Eof,
            Err(RecvTimeoutError::Timeout) => {
                return Err(self.fail(OP, format!("the bridge did not say ready within {} s", secs(self.timeout))));
            }
        };
        match incoming {
            Incoming::Event(event) => match *event {
                Event::Ready { protocol, mlx_lm, mlx, python } => {
                    if protocol != PROTOCOL_VERSION {
                        return Err(self.fail(
                            OP,
                            format!("the bridge speaks protocol {protocol}; this crate speaks {PROTOCOL_VERSION}"),
                        ));
                    }
                    self.versions = BridgeVersions { protocol, mlx_lm, mlx, python, ..self.versions.clone() };
                    Ok(())
                }
                Event::Error { error, .. } => {
                    let err = bridge_error(error);
                    self.kill_as(format!("the bridge failed to start: {err}"));
                    Err(err)
                }
                other => Err(self.fail(OP, format!("the bridge sent {} before ready", other.name()))),
            },
            other => Err(self.incoming_failure(OP, other)),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn versions(&self) -> &BridgeVersions {
        &self.versions
    }

    pub(crate) fn handle(&self) -> Arc<ChildHandle> {
        Arc::clone(&self.handle)
    }

    pub(crate) fn stderr(&self) -> Arc<StderrTail> {
        Arc::clone(&self.stderr)
    }

    /// Why the process can no longer be used, if it cannot.
    pub(crate) fn dead(&self) -> Option<&str> {
        self.dead.as_deref()
    }

    /// Sends `command` and waits for its reply, passing tokens to `ctl.on_token`.
    ///
    /// A cancelled token (or a consumer that stops taking tokens) sends `cancel` and waits for the
    /// bridge to end the request, at most the process timeout; then [`Error::Cancelled`]. Anything
    /// that leaves the protocol in an unknown state (the process ended, a malformed or oversized
    /// line, a reply to another request, a time limit) kills the process and marks it dead.
    pub(crate) fn exchange(&mut self, command: &Command, mut ctl: Control<'_>) -> Result<Event> {
        let op = command.name();
        if let Some(reason) = &self.dead {
            return Err(backend_error(format!("the bridge process is no longer usable: {reason}")));
        }
        let id = self.send(command, op)?;
        let started = Instant::now();
        let mut draining: Option<Instant> = None;
        loop {
            if draining.is_none() && ctl.cancel.is_some_and(CancelToken::is_cancelled) {
                self.send(&Command::Cancel { target: id }, op)?;
                draining = Some(Instant::now() + self.timeout);
            }
            let deadline = draining.or_else(|| ctl.timeout.map(|t| started + t));
            let poll = (ctl.cancel.is_some() && draining.is_none()).then_some(POLL);
            let wait = match (poll, deadline) {
                (Some(p), Some(d)) => Some(p.min(d.saturating_duration_since(Instant::now()))),
                (Some(p), None) => Some(p),
                (None, Some(d)) => Some(d.saturating_duration_since(Instant::now())),
                (None, None) => None,
            };
            let received = match wait {
                None => self.events.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(wait) => self.events.recv_timeout(wait),
            };
            let incoming = match received {
                Ok(incoming) => incoming,
                Err(RecvTimeoutError::Disconnected) => Incoming::Eof,
                Err(RecvTimeoutError::Timeout) => {
                    if deadline.is_none_or(|d| Instant::now() < d) {
                        continue;
                    }
                    if draining.is_some() {
                        self.kill_as(format!(
                            "the bridge did not end a cancelled {op} within {} s and was stopped",
                            secs(self.timeout)
                        ));
                        return Err(Error::Cancelled);
                    }
                    let limit = secs(ctl.timeout.unwrap_or(self.timeout));
                    return Err(self.fail(op, format!("the bridge did not answer within {limit} s")));
                }
            };
            let event = match incoming {
                Incoming::Event(event) => *event,
                other => return Err(self.incoming_failure(op, other)),
            };
            let expected = match event.id() {
                Some(got) => got == id,
                None => matches!(event, Event::Error { .. }),
            };
            if !expected {
                let got = event.id().map_or_else(|| "none".to_owned(), |g| g.to_string());
                let what = format!(
                    "the bridge sent a {} event for request {got} while request {id} was pending",
                    event.name()
                );
                return Err(self.fail(op, what));
            }
            match event {
                Event::Token { token, .. } => {
                    if draining.is_some() {
                        continue;
                    }
                    let Some(on_token) = ctl.on_token.as_mut() else {
                        return Err(self.fail(op, "the bridge sent a token event".to_owned()));
                    };
                    if on_token(token.into_token()).is_err() {
                        self.send(&Command::Cancel { target: id }, op)?;
                        draining = Some(Instant::now() + self.timeout);
                    }
                }
                Event::Cancelled { .. } => return Err(Error::Cancelled),
                Event::Error { error, .. } => return Err(bridge_error(error)),
                _ if draining.is_some() => return Err(Error::Cancelled),
                reply if reply.name() == command.reply() => return Ok(reply),
                other => {
                    let what = format!("the bridge answered with {} instead of {}", other.name(), command.reply());
                    return Err(self.fail(op, what));
                }
            }
        }
    }

    /// Asks the bridge to quit and waits for it to exit; kills it if it does not within a few
    /// seconds.
    ///
    /// # Errors
    ///
    /// The bridge exited unsuccessfully, or had to be killed.
    pub(crate) fn shutdown(mut self) -> Result<()> {
        if self.dead.is_some() {
            return Ok(());
        }
        let id = self.next_id;
        self.next_id += 1;
        let _ = self.write(id, &Command::Quit);
        drop(self.stdin.take());
        let deadline = Instant::now() + self.exit_grace();
        loop {
            match self.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Incoming::Eof | Incoming::Failed(_) | Incoming::Oversized) => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let status = self.handle.wait_exit(deadline.saturating_duration_since(Instant::now()));
        self.stderr.wait_closed(Duration::from_millis(200));
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(backend_error(format!(
                "the bridge process exited unsuccessfully ({status}) after quit{}",
                self.stderr.suffix()
            ))),
            None => {
                self.handle.kill();
                Err(backend_error(format!(
                    "the bridge process did not exit within {} s of quit and was killed{}",
                    secs(self.exit_grace()),
                    self.stderr.suffix()
                )))
            }
        }
    }

    fn exit_grace(&self) -> Duration {
        self.timeout.min(EXIT_GRACE)
    }

    fn write(&mut self, id: u64, command: &Command) -> io::Result<()> {
        let mut line = serde_json::to_vec(&Request { id, command }).map_err(io::Error::other)?;
        line.push(b'\n');
        let stdin = self.stdin.as_mut().ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stdin closed"))?;
        stdin.write_all(&line)?;
        stdin.flush()
    }

    /// Writes `command` with a fresh id; a failed write means the process has gone.
    fn send(&mut self, command: &Command, op: &str) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        match self.write(id, command) {
            Ok(()) => Ok(id),
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Err(self.exited(op)),
            Err(err) => Err(self.fail(op, format!("cannot write to the bridge: {err}"))),
        }
    }

    fn incoming_failure(&mut self, op: &str, incoming: Incoming) -> Error {
        match incoming {
            Incoming::Eof => self.exited(op),
            Incoming::Oversized => self.fail(op, format!("bridge line exceeds {MAX_LINE_BYTES} bytes")),
            Incoming::Malformed { excerpt, error } => {
                self.fail(op, format!("the bridge sent a malformed line ({error}): {excerpt}"))
            }
            Incoming::Failed(err) => self.fail(op, format!("cannot read the bridge's output: {err}")),
            Incoming::Event(event) => self.fail(op, format!("the bridge sent an unexpected {} event", event.name())),
        }
    }

    /// The process ended (its stdout closed): the error names its exit status and stderr.
    fn exited(&mut self, op: &str) -> Error {
        let status = self.handle.wait_exit(self.exit_grace());
        if status.is_none() {
            self.handle.kill();
        }
        self.stderr.wait_closed(Duration::from_secs(1));
        let status = status.map_or_else(|| "it closed its output and was killed".to_owned(), |s| s.to_string());
        let message = format!("the bridge process exited ({status}) during {op}{}", self.stderr.suffix());
        self.dead = Some(message.clone());
        backend_error(message)
    }

    /// Kills the process because of `what`; the error names it and the stderr tail.
    fn fail(&mut self, op: &str, what: String) -> Error {
        self.handle.kill();
        self.stderr.wait_closed(Duration::from_secs(1));
        let message = format!("{what} during {op}; the bridge process was stopped{}", self.stderr.suffix());
        self.dead = Some(message.clone());
        backend_error(message)
    }

    fn kill_as(&mut self, reason: String) {
        self.handle.kill();
        self.dead = Some(reason);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        drop(self.stdin.take());
        self.handle.kill();
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::pipes::parse;
    use super::*;
    use crate::protocol::WireError;

    #[test]
    fn stderr_tail_keeps_the_last_bytes() {
        let tail = StderrTail::default();
        assert_eq!(tail.suffix(), "; nothing on stderr");
        tail.push(b"first line\n");
        assert_eq!(tail.text(100), "first line");
        tail.push(&vec![b'x'; STDERR_TAIL_BYTES]);
        tail.push(b"\nlast line\n");
        let text = tail.text(STDERR_TAIL_BYTES);
        assert!(text.starts_with('…') && text.ends_with("last line"));
        assert!(!text.contains("first"));
        assert_eq!(tail.text(10), "…last line");
        tail.close();
        tail.wait_closed(Duration::from_secs(1));
    }

    #[test]
    fn malformed_lines_are_excerpted() {
        let Incoming::Malformed { excerpt, error } = parse(b"not json") else { panic!("parsed") };
        assert_eq!(excerpt, "not json");
        assert!(error.starts_with("expected ident"), "{error}");
        let long = vec![b'y'; 500];
        let Incoming::Malformed { excerpt, .. } = parse(&long) else { panic!("parsed") };
        assert_eq!(excerpt.chars().count(), 201);
        assert!(matches!(parse(br#"{"event":"cancelled","id":3}"#), Incoming::Event(_)));
    }

    #[test]
    fn bridge_errors_map_to_api_errors() {
        let e = |kind: &str, cause: Option<&str>| WireError {
            kind: kind.into(),
            message: "generate: boom".into(),
            operation: None,
            cause: cause.map(str::to_owned),
        };
        assert!(matches!(bridge_error(e("empty_prompt", None)), Error::EmptyPrompt));
        let err = bridge_error(WireError {
            operation: Some("chat without a chat template".into()),
            ..e("unsupported", None)
        });
        assert_eq!(err.to_string(), "backend \"mlx_lm\" does not support chat without a chat template");
        let err = bridge_error(e("failed", Some("Traceback: x")));
        assert_eq!(err.report(), "backend \"mlx_lm\": generate: boom: Python traceback:\nTraceback: x");
        assert_eq!(bridge_error(e("failed", Some("  "))).report(), "backend \"mlx_lm\": generate: boom");
    }
}
