// SPDX-License-Identifier: EUPL-1.2
//! `mlxr chat`: an interactive conversation, one line per user turn.
//!
//! The conversation runs on a [`ChatSession`] when the backend has them, so each turn prefills
//! only what is new; otherwise every turn sends the whole conversation again (same replies,
//! more prefill), and the command says so once at the start.
//!
//! Commands: `/reset`, `/system [TEXT]`, `/save FILE`, `/load FILE`, `/help`, `/exit`. `/save`
//! writes the conversation as JSON to FILE and, with a session, its KV cache to `FILE.kv`
//! (safetensors); `/load` reads both back, so the next turn starts from the cache. Ctrl-C during
//! a reply stops it (the turn is not kept); between turns it ends the chat.

use std::fs;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use inference_core::{CancelToken, ChatSession, Error, GenerateMetrics, GenerateSettings, Message, Role, TextModel};
use serde::{Deserialize, Serialize};

use crate::args::ChatArgs;
use crate::failure::{self, Failure};
use crate::generate::{context_full, metrics_line, stream_to};

const HELP: &str = "commands: /reset (forget the conversation), /system [TEXT] (set or clear the system message), \
                    /save FILE, /load FILE, /help, /exit";

/// The format name written into saved conversations.
const SAVE_FORMAT: &str = "mlxr-chat/1";

pub(crate) fn run(args: &ChatArgs) -> Result<(), Failure> {
    let settings = args.sampling.settings()?;
    crate::tensor_parallel::run(
        &args.tensor_parallel,
        &args.model,
        Vec::new(),
        crate::tensor_parallel::Terminal::Interactive,
        || chat(args, settings),
    )
}

fn chat(args: &ChatArgs, settings: GenerateSettings) -> Result<(), Failure> {
    let model = args.model.load_with(args.tensor_parallel.load_settings(args.model.load_settings()))?;
    let session = match model.new_session() {
        Ok(session) => Some(session),
        Err(Error::Unsupported { .. }) => {
            eprintln!("note: this backend keeps no chat sessions, so each turn prefills the whole conversation");
            None
        }
        Err(e) => {
            let _ = model.close();
            return Err(e.into());
        }
    };
    let mut conversation = Conversation::new(args.system.clone(), session);
    let interactive = io::stdin().is_terminal();
    if interactive {
        eprintln!("{HELP}");
    }
    let current = Turn::default();
    handle_ctrl_c(Arc::clone(&current));
    let options = ReplOptions { settings, metrics: args.metrics, interactive, current };
    let result = repl(
        model.as_ref(),
        &mut conversation,
        &mut io::stdin().lock(),
        &mut io::stdout(),
        &mut io::stderr(),
        &options,
    );
    drop(conversation);
    let closed = model.close();
    result?;
    closed.map_err(Failure::from)
}

/// One line of input, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Line {
    /// The user's next message.
    Say(String),
    /// Forget the conversation (the system message stays).
    Reset,
    /// Set (`Some`) or clear (`None`) the system message.
    System(Option<String>),
    /// Save the conversation.
    Save(PathBuf),
    /// Load a saved conversation.
    Load(PathBuf),
    /// Print the commands.
    Help,
    /// Leave.
    Exit,
    /// A blank line: nothing to do.
    Nothing,
}

/// Reads one line of input. A line starting with `/` is a command; `//` starts a message that
/// begins with `/`.
pub(crate) fn parse_line(line: &str) -> Result<Line, String> {
    let line = line.trim_end_matches(['\n', '\r']);
    if line.trim().is_empty() {
        return Ok(Line::Nothing);
    }
    if let Some(rest) = line.strip_prefix("//") {
        return Ok(Line::Say(format!("/{rest}")));
    }
    let Some(command) = line.trim().strip_prefix('/') else {
        return Ok(Line::Say(line.to_owned()));
    };
    let (name, arg) = match command.split_once(char::is_whitespace) {
        Some((name, arg)) => (name, arg.trim()),
        None => (command, ""),
    };
    let path = |usage: &str| if arg.is_empty() { Err(format!("usage: {usage}")) } else { Ok(PathBuf::from(arg)) };
    let no_arg = |line: Line| if arg.is_empty() { Ok(line) } else { Err(format!("/{name} takes no argument")) };
    match name {
        "reset" => no_arg(Line::Reset),
        "system" => Ok(Line::System((!arg.is_empty()).then(|| arg.to_owned()))),
        "save" => path("/save FILE").map(Line::Save),
        "load" => path("/load FILE").map(Line::Load),
        "help" | "?" => no_arg(Line::Help),
        "exit" | "quit" => no_arg(Line::Exit),
        other => Err(format!("unknown command /{other}; {HELP}")),
    }
}

/// What a saved conversation holds.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    format: String,
    system: Option<String>,
    messages: Vec<Message>,
}

/// The conversation so far, and the session that holds its cache (when the backend has one).
pub(crate) struct Conversation {
    system: Option<String>,
    turns: Vec<Message>,
    session: Option<Box<dyn ChatSession>>,
}

impl Conversation {
    pub(crate) fn new(system: Option<String>, session: Option<Box<dyn ChatSession>>) -> Self {
        Self { system, turns: Vec::new(), session }
    }

    /// Everything the model sees: the system message, then the turns.
    pub(crate) fn messages(&self) -> Vec<Message> {
        self.system.iter().map(|s| Message::system(s.as_str())).chain(self.turns.iter().cloned()).collect()
    }

    /// Sends `text` as the user's turn and streams the reply to `out`; the turn is kept only when
    /// the reply completes.
    fn reply(
        &mut self,
        model: &dyn TextModel,
        text: String,
        settings: &GenerateSettings,
        cancel: CancelToken,
        out: &mut impl Write,
    ) -> Result<GenerateMetrics, Failure> {
        self.turns.push(Message::user(text));
        let messages = self.messages();
        let stream = match &mut self.session {
            Some(session) => session.chat(&messages, settings, cancel),
            None => model.chat(&messages, settings, cancel),
        };
        let mut reply = Vec::new();
        let result = stream.map_err(Failure::from).and_then(|stream| {
            let metrics = stream_to(stream, &mut Tee { out: &mut *out, copy: &mut reply }, model)?;
            writeln!(out).map_err(|e| failure::io("writing to standard output", e))?;
            Ok(metrics)
        });
        match result {
            Ok(metrics) => {
                self.turns.push(Message::assistant(String::from_utf8_lossy(&reply).into_owned()));
                Ok(metrics)
            }
            Err(e) => {
                self.turns.pop();
                if !reply.is_empty() {
                    let _ = writeln!(out);
                }
                Err(e)
            }
        }
    }

    fn reset(&mut self) -> Result<(), Failure> {
        self.turns.clear();
        match &mut self.session {
            Some(session) => session.reset().map_err(Failure::from),
            None => Ok(()),
        }
    }

    fn cache_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".kv");
        PathBuf::from(name)
    }

    /// Writes the conversation to `path`, and the session's cache to `path.kv`.
    pub(crate) fn save(&self, path: &Path) -> Result<(), Failure> {
        let saved = Saved { format: SAVE_FORMAT.to_owned(), system: self.system.clone(), messages: self.turns.clone() };
        let text = serde_json::to_string_pretty(&saved).map_err(|e| Failure::new(format!("saving: {e}")))?;
        crate::output::write_file(path, (text + "\n").as_bytes())?;
        if let Some(session) = &self.session {
            session.save(&Self::cache_path(path))?;
        }
        Ok(())
    }

    /// Replaces the conversation with one saved by [`save`](Self::save); on failure it is
    /// unchanged.
    pub(crate) fn load(&mut self, path: &Path) -> Result<(), Failure> {
        let text =
            fs::read_to_string(path).map_err(|e| Failure::new(format!("cannot read {}: {e}", path.display())))?;
        let saved: Saved = serde_json::from_str(&text)
            .map_err(|e| Failure::new(format!("{} is not a saved conversation: {e}", path.display())))?;
        if saved.format != SAVE_FORMAT {
            return Err(Failure::new(format!(
                "{} has format {:?}; this mlxr reads {SAVE_FORMAT:?}",
                path.display(),
                saved.format
            )));
        }
        if let Some(m) = saved.messages.iter().find(|m| m.role == Role::SYSTEM) {
            return Err(Failure::new(format!(
                "{} holds a system message among the turns ({:?}); the system message is saved on its own",
                path.display(),
                m.content
            )));
        }
        if let Some(session) = &mut self.session {
            let cache = Self::cache_path(path);
            if cache.exists() { session.load(&cache)? } else { session.reset()? }
        }
        self.system = saved.system;
        self.turns = saved.messages;
        Ok(())
    }
}

/// Copies what is written to `out` into `copy` too.
struct Tee<'a, W: Write> {
    out: &'a mut W,
    copy: &'a mut Vec<u8>,
}

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

pub(crate) struct ReplOptions {
    pub(crate) settings: GenerateSettings,
    pub(crate) metrics: bool,
    pub(crate) interactive: bool,
    /// Where the running turn's cancel token is kept, for the Ctrl-C handler.
    pub(crate) current: Turn,
}

/// The running turn's cancel token, if a turn is running.
pub(crate) type Turn = Arc<Mutex<Option<CancelToken>>>;

/// On Ctrl-C: cancels the running turn, or, between turns, exits (status 130, as the shell's
/// default would). Without a handler (it could not be installed) Ctrl-C ends the process.
fn handle_ctrl_c(current: Turn) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        tracing::warn!("cannot watch for Ctrl-C; it will end the chat");
        return;
    };
    // Registered here, before the first turn, so no Ctrl-C is missed.
    #[cfg(unix)]
    let mut signals = {
        let _context = runtime.enter();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for Ctrl-C; it will end the chat");
                return;
            }
        }
    };
    let spawned = std::thread::Builder::new().name("ctrl-c".into()).spawn(move || {
        loop {
            #[cfg(unix)]
            let received = runtime.block_on(signals.recv()).is_some();
            #[cfg(not(unix))]
            let received = runtime.block_on(tokio::signal::ctrl_c()).is_ok();
            if !received {
                return;
            }
            let running = current.lock().unwrap_or_else(PoisonError::into_inner).take();
            match running {
                Some(turn) => {
                    turn.cancel();
                    eprintln!("(interrupted)");
                }
                None => {
                    eprintln!();
                    std::process::exit(130);
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch for Ctrl-C; it will end the chat");
    }
}

/// Reads lines from `input` until it ends or `/exit`; replies go to `out`, notes and errors to
/// `err`. A failed turn or command is reported and the conversation goes on.
pub(crate) fn repl(
    model: &dyn TextModel,
    conversation: &mut Conversation,
    input: &mut impl BufRead,
    out: &mut impl Write,
    err: &mut impl Write,
    options: &ReplOptions,
) -> Result<(), Failure> {
    let stderr = |e: io::Error| failure::io("writing to standard error", e);
    let mut line = String::new();
    loop {
        if options.interactive {
            write!(out, "> ").and_then(|()| out.flush()).map_err(|e| failure::io("writing to standard output", e))?;
        }
        line.clear();
        let n = input.read_line(&mut line).map_err(|e| failure::io("reading standard input", e))?;
        if n == 0 {
            return Ok(());
        }
        let outcome = match parse_line(&line) {
            Err(message) => Err(Failure::new(message)),
            Ok(Line::Nothing) => Ok(()),
            Ok(Line::Exit) => return Ok(()),
            Ok(Line::Help) => writeln!(err, "{HELP}").map_err(stderr),
            Ok(Line::Reset) => {
                conversation.reset().and_then(|()| writeln!(err, "(conversation reset)").map_err(stderr))
            }
            Ok(Line::System(text)) => {
                let note = if text.is_some() { "(system message set)" } else { "(system message cleared)" };
                conversation.system = text;
                writeln!(err, "{note}").map_err(stderr)
            }
            Ok(Line::Save(path)) => {
                conversation.save(&path).and_then(|()| writeln!(err, "(saved to {})", path.display()).map_err(stderr))
            }
            Ok(Line::Load(path)) => conversation.load(&path).and_then(|()| {
                writeln!(err, "(loaded {} turns from {})", conversation.turns.len(), path.display()).map_err(stderr)
            }),
            Ok(Line::Say(text)) => {
                let cancel = CancelToken::new();
                *options.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(cancel.clone());
                let replied = conversation.reply(model, text, &options.settings, cancel.clone(), out);
                options.current.lock().unwrap_or_else(PoisonError::into_inner).take();
                match replied {
                    Err(_) if cancel.is_cancelled() => {
                        writeln!(err, "(the reply was interrupted and is not kept)").map_err(stderr)
                    }
                    Err(e) => Err(e),
                    Ok(metrics) => {
                        let full = context_full(&metrics, "/reset starts a new conversation");
                        let full = full.map_or(Ok(()), |note| writeln!(err, "{note}").map_err(stderr));
                        let line = options.metrics.then(|| metrics_line(&metrics, true));
                        full.and_then(|()| line.map_or(Ok(()), |l| writeln!(err, "{l}").map_err(stderr)))
                    }
                }
            }
        };
        if let Err(failure) = outcome {
            writeln!(err, "error: {failure}").map_err(stderr)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use inference_core::{
        BatchResult, ClassifyResult, ModelInfo, Result as CoreResult, Token, TokenStream, TokenStream as Stream,
    };

    #[test]
    fn lines_are_commands_or_messages() {
        assert_eq!(parse_line("hello there\n"), Ok(Line::Say("hello there".into())));
        assert_eq!(parse_line("  \n"), Ok(Line::Nothing));
        assert_eq!(parse_line("/reset\n"), Ok(Line::Reset));
        assert_eq!(parse_line("/system  be brief \n"), Ok(Line::System(Some("be brief".into()))));
        assert_eq!(parse_line("/system"), Ok(Line::System(None)));
        assert_eq!(parse_line("/save a b.json"), Ok(Line::Save("a b.json".into())));
        assert_eq!(parse_line("/load x"), Ok(Line::Load("x".into())));
        assert_eq!(parse_line("/exit"), Ok(Line::Exit));
        assert_eq!(parse_line("/quit"), Ok(Line::Exit));
        assert_eq!(parse_line("/help"), Ok(Line::Help));
        assert_eq!(parse_line("//etc/hosts is a file"), Ok(Line::Say("/etc/hosts is a file".into())));
    }

    #[test]
    fn bad_commands_say_what_is_wrong() {
        assert_eq!(parse_line("/save"), Err("usage: /save FILE".into()));
        assert_eq!(parse_line("/load   "), Err("usage: /load FILE".into()));
        assert_eq!(parse_line("/reset now"), Err("/reset takes no argument".into()));
        assert!(parse_line("/frob").unwrap_err().starts_with("unknown command /frob; commands:"));
        assert!(parse_line("/").unwrap_err().starts_with("unknown command /;"));
    }

    /// A model that answers with the number of messages it was sent and the last one's text, and
    /// records what each session saw.
    struct Echo {
        seen: Arc<Mutex<Vec<Vec<Message>>>>,
        sessions: bool,
    }

    fn reply_to(messages: &[Message]) -> CoreResult<TokenStream> {
        let last = messages.last().ok_or(Error::EmptyPrompt)?;
        let text = format!("{}:{}", messages.len(), last.content);
        Ok([Token::new(1, text)].into_iter().collect())
    }

    impl TextModel for Echo {
        fn generate(&self, p: &str, _: &GenerateSettings, _: CancelToken) -> CoreResult<Stream> {
            reply_to(&[Message::user(p)])
        }
        fn chat(&self, m: &[Message], _: &GenerateSettings, _: CancelToken) -> CoreResult<Stream> {
            self.seen.lock().unwrap().push(m.to_vec());
            reply_to(m)
        }
        fn classify(&self, _: &[&str], _: &GenerateSettings, _: CancelToken) -> CoreResult<Vec<ClassifyResult>> {
            Err(Error::unsupported("echo", "classification"))
        }
        fn batch_generate(&self, _: &[&str], _: &GenerateSettings, _: CancelToken) -> CoreResult<Vec<BatchResult>> {
            Err(Error::unsupported("echo", "batches"))
        }
        fn info(&self) -> ModelInfo {
            ModelInfo::default()
        }
        fn metrics(&self) -> GenerateMetrics {
            GenerateMetrics::default()
        }
        fn model_type(&self) -> &str {
            "echo"
        }
        fn close(&self) -> CoreResult<()> {
            Ok(())
        }
        fn new_session(&self) -> CoreResult<Box<dyn ChatSession>> {
            if !self.sessions {
                return Err(Error::unsupported("echo", "chat sessions"));
            }
            Ok(Box::new(EchoSession { cached: 0, seen: Arc::clone(&self.seen) }))
        }
    }

    /// A session whose "cache" is the number of messages seen; saved as that number in a file.
    struct EchoSession {
        cached: usize,
        seen: Arc<Mutex<Vec<Vec<Message>>>>,
    }

    impl ChatSession for EchoSession {
        fn chat(&mut self, m: &[Message], _: &GenerateSettings, _: CancelToken) -> CoreResult<Stream> {
            self.seen.lock().unwrap().push(m.to_vec());
            self.cached = m.len();
            reply_to(m)
        }
        fn generate(&mut self, p: &str, _: &GenerateSettings, _: CancelToken) -> CoreResult<Stream> {
            reply_to(&[Message::user(p)])
        }
        fn cached_tokens(&self) -> CoreResult<usize> {
            Ok(self.cached)
        }
        fn reset(&mut self) -> CoreResult<()> {
            self.cached = 0;
            Ok(())
        }
        fn save(&self, path: &Path) -> CoreResult<()> {
            fs::write(path, self.cached.to_string()).map_err(|e| Error::io(path, e))
        }
        fn load(&mut self, path: &Path) -> CoreResult<()> {
            let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            self.cached = text.parse().map_err(|_| Error::invalid_model(path, "not a session"))?;
            Ok(())
        }
    }

    fn run_script(model: &Echo, conversation: &mut Conversation, script: &str) -> (String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let options = ReplOptions {
            settings: GenerateSettings::new(),
            metrics: false,
            interactive: false,
            current: Turn::default(),
        };
        repl(model, conversation, &mut script.as_bytes(), &mut out, &mut err, &options).unwrap();
        (String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    #[test]
    fn a_conversation_with_a_session_saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("talk.json");
        let model = Echo { seen: Arc::default(), sessions: true };
        let mut conversation = Conversation::new(Some("sys".into()), model.new_session().ok());
        let script = format!(
            "hi\n\nagain\n/save {}\n/reset\nfresh\n/load {}\n/bogus\nafter load\n",
            file.display(),
            file.display()
        );
        let (out, err) = run_script(&model, &mut conversation, &script);
        // System + user = 2; + assistant + user = 4; after the reset: 2; after the load: 6.
        assert_eq!(out, "2:hi\n4:again\n2:fresh\n6:after load\n");
        assert!(err.contains("(saved to "), "{err}");
        assert!(err.contains("(conversation reset)"), "{err}");
        assert!(err.contains("(loaded 4 turns from "), "{err}");
        assert!(err.contains("error: unknown command /bogus"), "{err}");
        assert_eq!(fs::read_to_string(Conversation::cache_path(&file)).unwrap(), "4");
        let seen = model.seen.lock().unwrap();
        assert_eq!(seen[3][0], Message::system("sys"));
        assert_eq!(seen[3][2], Message::assistant("2:hi"));
        assert_eq!(seen[3][4], Message::assistant("4:again"));
        assert_eq!(conversation.session.as_ref().unwrap().cached_tokens().unwrap(), 6);
    }

    #[test]
    fn without_sessions_the_whole_conversation_is_sent_and_saved() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("talk.json");
        let model = Echo { seen: Arc::default(), sessions: false };
        let mut conversation = Conversation::new(None, None);
        let script = format!("one\n/system terse\ntwo\n/save {}\n/system\n/exit\nnever\n", file.display());
        let (out, err) = run_script(&model, &mut conversation, &script);
        assert_eq!(out, "1:one\n4:two\n");
        assert!(err.contains("(system message set)") && err.contains("(system message cleared)"), "{err}");
        assert!(!Conversation::cache_path(&file).exists());
        let mut fresh = Conversation::new(None, None);
        fresh.load(&file).unwrap();
        assert_eq!(fresh.system.as_deref(), Some("terse"));
        assert_eq!(fresh.turns.len(), 4);
    }

    #[test]
    fn loading_a_bad_file_leaves_the_conversation_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut conversation = Conversation::new(Some("keep".into()), None);
        conversation.turns.push(Message::user("kept"));
        let missing = dir.path().join("missing.json");
        assert!(conversation.load(&missing).unwrap_err().message().starts_with("cannot read "));
        let junk = dir.path().join("junk.json");
        fs::write(&junk, "{not json").unwrap();
        assert!(conversation.load(&junk).unwrap_err().message().contains("is not a saved conversation"));
        let other = dir.path().join("other.json");
        fs::write(&other, r#"{"format":"x/9","system":null,"messages":[]}"#).unwrap();
        assert!(conversation.load(&other).unwrap_err().message().contains("has format \"x/9\""));
        let sneaky = dir.path().join("sneaky.json");
        let text = r#"{"format":"mlxr-chat/1","system":null,"messages":[{"role":"system","content":"x"}]}"#;
        fs::write(&sneaky, text).unwrap();
        assert!(conversation.load(&sneaky).unwrap_err().message().contains("system message among the turns"));
        assert_eq!(conversation.messages(), [Message::system("keep"), Message::user("kept")]);
    }

    #[test]
    fn a_failed_turn_is_not_kept() {
        let model = Echo { seen: Arc::default(), sessions: false };
        let mut conversation = Conversation::new(None, None);
        let mut out = Vec::new();
        let err = conversation.reply(&model, String::new(), &GenerateSettings::new(), CancelToken::new(), &mut out);
        assert!(err.is_ok(), "the echo model accepts an empty message");
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("closed"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let before = conversation.turns.len();
        let err = conversation
            .reply(&model, "x".into(), &GenerateSettings::new(), CancelToken::new(), &mut Broken)
            .unwrap_err();
        assert_eq!(err.message(), "writing to standard output: closed");
        assert_eq!(conversation.turns.len(), before);
    }
}
