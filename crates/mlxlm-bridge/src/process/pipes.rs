// SPDX-License-Identifier: EUPL-1.2
//! The child's pipes: the thread that reads its stdout into [`Incoming`] events, the thread that
//! drains its stderr into a [`StderrTail`], and the [`ChildHandle`] that kills and reaps it from
//! any thread.

use std::io::{self, BufReader, Read};
use std::process::{Child, ChildStderr, ChildStdout, ExitStatus};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::{MAX_LINE_BYTES, STDERR_TAIL_BYTES};
use crate::lines::{Line, read_line};
use crate::protocol::Event;

/// How much of the kept stderr goes into an error message.
const STDERR_IN_ERRORS: usize = 4 * 1024;

/// The last bytes the bridge wrote to stderr, filled by the drain thread.
#[derive(Debug, Default)]
pub(crate) struct StderrTail {
    state: Mutex<TailState>,
    closed: Condvar,
}

#[derive(Debug, Default)]
struct TailState {
    bytes: Vec<u8>,
    dropped: bool,
    closed: bool,
}

impl StderrTail {
    fn lock(&self) -> MutexGuard<'_, TailState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn push(&self, bytes: &[u8]) {
        let mut state = self.lock();
        state.bytes.extend_from_slice(bytes);
        if state.bytes.len() > STDERR_TAIL_BYTES {
            let excess = state.bytes.len() - STDERR_TAIL_BYTES;
            state.bytes.drain(..excess);
            state.dropped = true;
        }
    }

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.closed.notify_all();
    }

    pub(super) fn wait_closed(&self, timeout: Duration) {
        let state = self.lock();
        let _ = self.closed.wait_timeout_while(state, timeout, |s| !s.closed);
    }

    /// The last `max` bytes as text (lossy), with "…" in front when earlier output was cut.
    pub(crate) fn text(&self, max: usize) -> String {
        let state = self.lock();
        let start = state.bytes.len().saturating_sub(max);
        let text = String::from_utf8_lossy(&state.bytes[start..]);
        let text = text.trim();
        if start > 0 || state.dropped { format!("…{text}") } else { text.to_owned() }
    }

    /// "; stderr: …" for an error message, or a note that there was none.
    pub(super) fn suffix(&self) -> String {
        let text = self.text(STDERR_IN_ERRORS);
        if text.is_empty() { "; nothing on stderr".to_owned() } else { format!("; stderr: {text}") }
    }
}

/// The child, shared so that it can be killed from any thread while an exchange runs.
#[derive(Debug)]
pub(crate) struct ChildHandle {
    child: Mutex<Child>,
}

impl ChildHandle {
    /// Takes `child` into a handle.
    pub(super) fn new(child: Child) -> Self {
        Self { child: Mutex::new(child) }
    }

    fn lock(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Kills the child if it is still running and reaps it. Idempotent.
    pub(crate) fn kill(&self) {
        let mut child = self.lock();
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// The exit status if the child has exited (it is reaped then), without waiting.
    pub(crate) fn exited(&self) -> Option<ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }

    /// The exit status once the child has exited, waiting at most `timeout`.
    pub(super) fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lock().try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {}
                Ok(None) | Err(_) => return None,
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// What the stdout reader hands over.
#[derive(Debug)]
pub(crate) enum Incoming {
    Event(Box<Event>),
    Malformed { excerpt: String, error: String },
    Oversized,
    Eof,
    Failed(io::Error),
}

/// Starts the stdout reader and the stderr drain.
pub(super) fn spawn_threads(
    stdout: ChildStdout,
    stderr: ChildStderr,
    tx: SyncSender<Incoming>,
    tail: Arc<StderrTail>,
) -> io::Result<()> {
    thread::Builder::new().name("mlxlm-stdout".into()).spawn(move || read_stdout(stdout, &tx))?;
    thread::Builder::new().name("mlxlm-stderr".into()).spawn(move || drain_stderr(stderr, &tail))?;
    Ok(())
}

fn read_stdout(stdout: ChildStdout, tx: &SyncSender<Incoming>) {
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    loop {
        let incoming = match read_line(&mut reader, MAX_LINE_BYTES) {
            Ok(Line::Complete(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Line::Complete(line)) => parse(&line),
            Ok(Line::Eof) => Incoming::Eof,
            Ok(Line::TooLong) => Incoming::Oversized,
            Err(err) => Incoming::Failed(err),
        };
        let last = !matches!(incoming, Incoming::Event(_) | Incoming::Malformed { .. });
        if tx.send(incoming).is_err() || last {
            return;
        }
    }
}

/// One stdout line as an event, or an excerpt of it and why it is not one.
pub(super) fn parse(line: &[u8]) -> Incoming {
    match serde_json::from_slice::<Event>(line) {
        Ok(event) => Incoming::Event(Box::new(event)),
        Err(err) => {
            let text = String::from_utf8_lossy(line);
            let mut excerpt: String = text.chars().take(200).collect();
            if excerpt.len() < text.len() {
                excerpt.push('…');
            }
            Incoming::Malformed { excerpt, error: err.to_string() }
        }
    }
}

fn drain_stderr(mut stderr: ChildStderr, tail: &StderrTail) {
    let mut buf = [0u8; 8192];
    loop {
        match stderr.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => tail.push(&buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    tail.close();
}
