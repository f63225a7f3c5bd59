// SPDX-License-Identifier: EUPL-1.2
//! [`BridgeModel`]: a model loaded in a bridge process, as an inference-core [`TextModel`].

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use inference_core::{
    AttentionInspector, AttentionSnapshot, BatchResult, CancelToken, ClassifyResult, Error, GenerateMetrics,
    GenerateSettings, LogitsMode, Message, ModelInfo, Result, TextModel, Token, TokenSink, TokenStream, ToolChoice,
    tools,
};

use crate::BACKEND_NAME;
use crate::process::{BridgeVersions, ChildHandle, Control, Process, STDERR_TAIL_BYTES, StderrTail, bridge_error};
use crate::protocol::{Command, Event, WireSettings, WireStats};

/// How often a call waiting for the model (busy with another call) looks at its cancel token.
const BUSY_POLL: Duration = Duration::from_millis(50);

/// A model loaded in its own bridge process.
///
/// Calls are serialised: one request at a time reaches the process, in the order the calls get
/// the model; [`generate`](TextModel::generate) and [`chat`](TextModel::chat) return their stream
/// at once and wait for their turn on the stream's own thread. The process lives while the handle
/// or any of its streams does, and is killed when the last of them is dropped;
/// [`close`](TextModel::close) ends it gracefully instead (and stops a call in progress).
pub struct BridgeModel {
    shared: Arc<Shared>,
}

struct Shared {
    slot: Mutex<Slot>,
    returned: Condvar,
    closed: AtomicBool,
    handle: Arc<ChildHandle>,
    stderr: Arc<StderrTail>,
    pid: u32,
    model_type: String,
    info: ModelInfo,
    /// Whether the chat template renders tools itself (else the fallback messages go).
    tools_native: bool,
    versions: BridgeVersions,
    metrics: Mutex<GenerateMetrics>,
}

/// Who has the process.
enum Slot {
    /// Nobody: the next call takes it.
    Idle(Box<Process>),
    /// A call (a [`Lease`]) has it.
    Busy,
    /// It is gone, for this reason.
    Gone(String),
}

/// A call's exclusive use of the process; gives it back (or records its end) on drop.
struct Lease {
    shared: Arc<Shared>,
    process: Option<Box<Process>>,
}

const CLOSED: &str = "the model was closed";

// The handle is shared across threads as `Arc<dyn TextModel>`.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<BridgeModel>();
};

impl Shared {
    fn lock_slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// `err`, or [`Error::Closed`] when the model was closed while the call ran.
    fn closed_or(&self, err: Error) -> Error {
        if self.is_closed() && !err.is_cancelled() { Error::Closed } else { err }
    }

    fn set_metrics(&self, metrics: GenerateMetrics) {
        *self.metrics.lock().unwrap_or_else(PoisonError::into_inner) = metrics;
    }

    /// Waits for the process, giving up when `cancel` is cancelled or the model is closed.
    fn acquire(self: &Arc<Self>, cancel: Option<&CancelToken>) -> Result<Lease> {
        let mut slot = self.lock_slot();
        loop {
            if self.is_closed() {
                return Err(Error::Closed);
            }
            match std::mem::replace(&mut *slot, Slot::Busy) {
                Slot::Idle(process) => return Ok(Lease { shared: Arc::clone(self), process: Some(process) }),
                Slot::Busy => {}
                Slot::Gone(reason) => {
                    let err = Error::backend(BACKEND_NAME, format!("the bridge process is no longer usable: {reason}"));
                    *slot = Slot::Gone(reason);
                    return Err(err);
                }
            }
            if cancel.is_some_and(CancelToken::is_cancelled) {
                return Err(Error::Cancelled);
            }
            slot = self.returned.wait_timeout(slot, BUSY_POLL).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Runs one exchange with the process (waiting for it first) under `cancel`.
    fn call(self: &Arc<Self>, command: &Command, cancel: &CancelToken) -> Result<(Event, Duration)> {
        let mut lease = self.acquire(Some(cancel))?;
        let started = Instant::now();
        let result = lease.exchange(command, Control::cancellable(cancel));
        drop(lease);
        result.map(|event| (event, started.elapsed())).map_err(|err| self.closed_or(err))
    }
}

impl Lease {
    /// Runs one exchange with the leased process.
    fn exchange(&mut self, command: &Command, ctl: Control<'_>) -> Result<Event> {
        match self.process.as_deref_mut() {
            Some(process) => process.exchange(command, ctl),
            // Not reached: the process stays in the lease from creation until drop.
            None => Err(Error::backend(BACKEND_NAME, "the bridge process was already given back")),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(process) = self.process.take() else { return };
        let mut slot = self.shared.lock_slot();
        let finished = if self.shared.is_closed() {
            *slot = Slot::Gone(CLOSED.to_owned());
            Some(process)
        } else if let Some(reason) = process.dead() {
            *slot = Slot::Gone(reason.to_owned());
            Some(process)
        } else {
            *slot = Slot::Idle(process);
            None
        };
        drop(slot);
        self.shared.returned.notify_all();
        // Killed and reaped outside the lock.
        drop(finished);
    }
}

impl BridgeModel {
    pub(crate) fn new(process: Process, model_type: String, mut info: ModelInfo, tools_native: bool) -> Self {
        if info.architecture.is_empty() {
            info.architecture.clone_from(&model_type);
        }
        let shared = Shared {
            handle: process.handle(),
            stderr: process.stderr(),
            pid: process.pid(),
            versions: process.versions().clone(),
            slot: Mutex::new(Slot::Idle(Box::new(process))),
            returned: Condvar::new(),
            closed: AtomicBool::new(false),
            model_type,
            info,
            tools_native,
            metrics: Mutex::new(GenerateMetrics::default()),
        };
        Self { shared: Arc::new(shared) }
    }

    /// The bridge process's id (it may have exited since).
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// What the bridge reported at start-up: protocol, mlx-lm, MLX and Python versions.
    pub fn versions(&self) -> &BridgeVersions {
        &self.shared.versions
    }

    /// The last [`STDERR_TAIL_BYTES`] of the bridge's stderr (Python warnings and tracebacks),
    /// starting with "…" when earlier output was dropped.
    pub fn stderr_tail(&self) -> String {
        self.shared.stderr.text(STDERR_TAIL_BYTES)
    }

    fn ensure_open(&self) -> Result<()> {
        if self.shared.is_closed() { Err(Error::Closed) } else { Ok(()) }
    }

    fn stream(&self, command: Command, cancel: CancelToken) -> Result<TokenStream> {
        let (sink, stream) = TokenStream::channel(cancel);
        let shared = Arc::clone(&self.shared);
        thread::Builder::new()
            .name("mlxlm-stream".into())
            .spawn(move || run_stream(&shared, &command, sink))
            .map_err(|err| Error::backend_with_source(BACKEND_NAME, "cannot start a generation thread", err))?;
        Ok(stream)
    }

    /// Runs a command that answers with one result per prompt (nothing to send for no prompts):
    /// `results` takes the results and stats out of the reply, or gives back an unexpected one.
    /// Checks that the count matches the prompts (naming `what` when not) and records the metrics.
    fn per_prompt<T>(
        &self,
        what: &str,
        prompts: &[&str],
        command: impl FnOnce(Vec<String>) -> Command,
        results: impl FnOnce(Event) -> std::result::Result<(Vec<T>, WireStats), Event>,
        cancel: &CancelToken,
    ) -> Result<Vec<T>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let command = command(prompts.iter().map(|p| (*p).to_owned()).collect());
        let (event, elapsed) = self.shared.call(&command, cancel)?;
        let (results, stats) = results(event).map_err(|event| unexpected(&event))?;
        if results.len() != prompts.len() {
            return Err(count_mismatch(what, results.len(), prompts.len()));
        }
        self.shared.set_metrics(stats.metrics(elapsed));
        Ok(results)
    }
}

/// The body of a stream's thread: wait for the process, run the request, feed the sink.
fn run_stream(shared: &Arc<Shared>, command: &Command, sink: TokenSink) {
    let cancel = sink.cancel_token().clone();
    let mut lease = match shared.acquire(Some(&cancel)) {
        Ok(lease) => lease,
        Err(err) => return sink.fail(err),
    };
    let started = Instant::now();
    let result = {
        let mut on_token = |token: Token| sink.send(token);
        let ctl = Control { cancel: Some(&cancel), timeout: None, on_token: Some(&mut on_token) };
        lease.exchange(command, ctl)
    };
    drop(lease);
    match result {
        Ok(Event::Done { stats, .. }) => {
            let metrics = stats.metrics(started.elapsed());
            shared.set_metrics(metrics);
            sink.finish(metrics);
        }
        // The exchange only returns the command's own reply.
        Ok(other) => sink.fail(Error::backend(BACKEND_NAME, format!("unexpected {} reply", other.name()))),
        Err(err) => sink.fail(shared.closed_or(err)),
    }
}

fn unexpected(event: &Event) -> Error {
    Error::backend(BACKEND_NAME, format!("unexpected {} reply", event.name()))
}

fn count_mismatch(what: &str, got: usize, expected: usize) -> Error {
    Error::backend(BACKEND_NAME, format!("the bridge returned {got} {what} results for {expected} prompts"))
}

impl TextModel for BridgeModel {
    fn generate(&self, prompt: &str, settings: &GenerateSettings, cancel: CancelToken) -> Result<TokenStream> {
        check(settings)?;
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        self.ensure_open()?;
        self.stream(Command::Generate { prompt: prompt.to_owned(), settings: settings.into() }, cancel)
    }

    fn chat(&self, messages: &[Message], settings: &GenerateSettings, cancel: CancelToken) -> Result<TokenStream> {
        check(settings)?;
        if messages.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        self.ensure_open()?;
        let offered = if settings.tool_choice == ToolChoice::None { &[][..] } else { &settings.tools[..] };
        // A template without tools gets the fallback only when tools are offered (as on metal).
        let (messages, tools) = if self.shared.tools_native || offered.is_empty() {
            (messages.to_vec(), offered.to_vec())
        } else {
            (tools::fallback_messages(messages, offered), Vec::new())
        };
        self.stream(Command::Chat { messages, tools, settings: settings.into() }, cancel)
    }

    fn classify(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> Result<Vec<ClassifyResult>> {
        check(settings)?;
        if prompts.iter().any(|p| p.is_empty()) {
            return Err(Error::EmptyPrompt);
        }
        self.ensure_open()?;
        let results = self.per_prompt(
            "classify",
            prompts,
            |prompts| Command::Classify { prompts, settings: WireSettings::from(settings) },
            |event| match event {
                Event::Classified { results, stats, .. } => Ok((results, stats)),
                other => Err(other),
            },
            &cancel,
        )?;
        let want_logits = settings.logits != LogitsMode::None;
        Ok(results
            .into_iter()
            .map(|r| {
                let (token, logits) = r.into_parts();
                ClassifyResult { token, logits: logits.filter(|_| want_logits) }
            })
            .collect())
    }

    fn batch_generate(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> Result<Vec<BatchResult>> {
        check(settings)?;
        self.ensure_open()?;
        let results = self.per_prompt(
            "batch",
            prompts,
            |prompts| Command::BatchGenerate { prompts, settings: WireSettings::from(settings) },
            |event| match event {
                Event::Batch { results, stats, .. } => Ok((results, stats)),
                other => Err(other),
            },
            &cancel,
        )?;
        Ok(results
            .into_iter()
            .map(|r| BatchResult {
                tokens: r.tokens.into_iter().map(|t| t.into_token()).collect(),
                error: r.error.map(bridge_error),
            })
            .collect())
    }

    fn info(&self) -> ModelInfo {
        self.shared.info.clone()
    }

    fn metrics(&self) -> GenerateMetrics {
        *self.shared.metrics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn model_type(&self) -> &str {
        &self.shared.model_type
    }

    /// Sends `quit` and waits (five seconds at most) for the process to exit; a call in
    /// progress is stopped by killing the process and ends with [`Error::Closed`].
    /// The bridge process is alive and usable: not exited, and not marked unusable by a call
    /// that lost track of the protocol.
    fn health(&self) -> Result<()> {
        self.ensure_open()?;
        if let Slot::Gone(reason) = &*self.shared.lock_slot() {
            return Err(Error::backend(BACKEND_NAME, format!("the bridge process is no longer usable: {reason}")));
        }
        if let Some(status) = self.shared.handle.exited() {
            let tail = self.stderr_tail();
            let tail =
                if tail.trim().is_empty() { String::new() } else { format!("; its last words: {}", tail.trim()) };
            return Err(Error::backend(BACKEND_NAME, format!("the bridge process exited ({status}){tail}")));
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let previous = std::mem::replace(&mut *self.shared.lock_slot(), Slot::Gone(CLOSED.to_owned()));
        self.shared.returned.notify_all();
        match previous {
            Slot::Idle(process) => process.shutdown(),
            Slot::Busy => {
                self.shared.handle.kill();
                Ok(())
            }
            Slot::Gone(_) => Ok(()),
        }
    }

    fn attention_inspector(&self) -> Option<&dyn AttentionInspector> {
        Some(self)
    }

    /// mlx-lm's prompt cache lives in the subprocess; the bridge does not expose sessions yet.
    fn new_session(&self) -> Result<Box<dyn inference_core::ChatSession>> {
        Err(Error::unsupported(BACKEND_NAME, "chat sessions"))
    }
}

impl AttentionInspector for BridgeModel {
    fn inspect_attention(&self, prompt: &str, cancel: CancelToken) -> Result<AttentionSnapshot> {
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        self.ensure_open()?;
        let dir = tempfile::Builder::new()
            .prefix("mlxlm-inspect-")
            .tempdir()
            .map_err(|err| Error::io(std::env::temp_dir(), err))?;
        let dir_text = dir
            .path()
            .to_str()
            .ok_or_else(|| Error::backend(BACKEND_NAME, "the temporary directory's path is not valid UTF-8"))?
            .to_owned();
        let command = Command::Inspect { prompt: prompt.to_owned(), dir: dir_text };
        let (event, _) = self.shared.call(&command, &cancel)?;
        let Event::Inspected { num_layers, num_q_heads, num_kv_heads, seq_len, head_dim, architecture, .. } = event
        else {
            return Err(unexpected(&event));
        };
        let mut keys = Vec::with_capacity(num_layers.min(1024));
        let mut queries = Vec::with_capacity(num_layers.min(1024));
        for layer in 0..num_layers {
            keys.push(read_heads(&dir.path().join(format!("keys_{layer}.bin")), num_kv_heads, seq_len, head_dim)?);
            queries.push(read_heads(&dir.path().join(format!("queries_{layer}.bin")), num_q_heads, seq_len, head_dim)?);
        }
        Ok(AttentionSnapshot {
            num_layers,
            num_heads: num_kv_heads,
            seq_len,
            head_dim,
            num_query_heads: num_q_heads,
            keys,
            queries,
            architecture: if architecture.is_empty() { self.shared.model_type.clone() } else { architecture },
        })
    }
}

/// Reads `heads` blocks of `seq_len * head_dim` little-endian f32 values from `path`.
fn read_heads(path: &Path, heads: usize, seq_len: usize, head_dim: usize) -> Result<Vec<Vec<f32>>> {
    let per_head = seq_len.checked_mul(head_dim);
    let expected = per_head.and_then(|n| n.checked_mul(heads)).and_then(|n| n.checked_mul(4));
    let (Some(per_head), Some(expected)) = (per_head, expected) else {
        return Err(Error::backend(BACKEND_NAME, "the attention snapshot's dimensions overflow"));
    };
    let bytes = std::fs::read(path).map_err(|err| Error::io(path, err))?;
    if bytes.len() != expected {
        return Err(Error::backend(
            BACKEND_NAME,
            format!("{} holds {} bytes; expected {expected}", path.display(), bytes.len()),
        ));
    }
    // A prompt has a position and a head a feature: an empty head would let `heads` ask for any
    // number of empty blocks, which nothing in the file bounds.
    if per_head == 0 {
        return Err(Error::backend(
            BACKEND_NAME,
            format!("the attention snapshot has seq_len {seq_len} and head_dim {head_dim}; both must be at least 1"),
        ));
    }
    let values: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(values.chunks(per_head).map(<[f32]>::to_vec).collect())
}

impl fmt::Debug for BridgeModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeModel")
            .field("model_type", &self.shared.model_type)
            .field("pid", &self.shared.pid)
            .field("closed", &self.shared.is_closed())
            .finish_non_exhaustive()
    }
}

/// The settings checked, and those this backend cannot honour refused by name.
fn check(settings: &GenerateSettings) -> Result<()> {
    settings.validate()?;
    if let Some(k) = settings.top_logprobs {
        return Err(Error::invalid_setting(
            "top_logprobs",
            k,
            "the mlx_lm backend does not report the most likely tokens yet (the metal backend does)",
        ));
    }
    if let Some(c) = &settings.constraint {
        return Err(Error::invalid_setting(
            "constraint",
            c.kind(),
            "the mlx_lm backend has no constrained decoding (the metal backend does)",
        ));
    }
    match &settings.tool_choice {
        ToolChoice::Required | ToolChoice::Function(_) => Err(Error::invalid_setting(
            "tool_choice",
            "required",
            "forcing a tool call needs constrained decoding, which the mlx_lm backend lacks (the metal backend has it)",
        )),
        ToolChoice::Auto | ToolChoice::None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_this_backend_cannot_honour_are_refused_by_name() {
        assert!(check(&GenerateSettings::default()).is_ok());
        let e = check(&GenerateSettings::default().top_logprobs(2)).unwrap_err();
        assert!(e.to_string().contains("top_logprobs") && e.to_string().contains("mlx_lm"), "{e}");
        let e = check(&GenerateSettings::default().constraint(inference_core::Constraint::JsonObject)).unwrap_err();
        assert!(e.to_string().contains("constraint") && e.to_string().contains("mlx_lm"), "{e}");
        let tool = serde_json::json!({"type": "function", "function": {"name": "f"}});
        let e = check(&GenerateSettings::default().tools([tool]).tool_choice(ToolChoice::Required)).unwrap_err();
        assert!(e.to_string().contains("tool_choice") && e.to_string().contains("mlx_lm"), "{e}");
    }

    #[test]
    fn read_heads_checks_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.bin");
        let values: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, &values).unwrap();
        assert_eq!(read_heads(&path, 2, 3, 1).unwrap(), [vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]);
        let err = read_heads(&path, 2, 2, 2).unwrap_err();
        assert!(err.to_string().ends_with("holds 24 bytes; expected 32"), "{err}");
        assert!(read_heads(&path, usize::MAX, usize::MAX, 2).is_err());
        assert!(matches!(read_heads(&dir.path().join("none"), 1, 1, 1), Err(Error::Io { .. })));
        // No positions: nothing in the file bounds the head count, so it is refused (the fuzz
        // target `inspect_answers_at_their_edges_...` found 2⁶⁴ − 1 heads of nothing a panic).
        std::fs::write(&path, []).unwrap();
        let err = read_heads(&path, 2, 0, 4).unwrap_err();
        assert!(err.to_string().contains("seq_len 0 and head_dim 4; both must be at least 1"), "{err}");
        assert!(read_heads(&path, usize::MAX, 1, 0).is_err());
    }
}
