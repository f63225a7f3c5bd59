// SPDX-License-Identifier: EUPL-1.2
//! Token streams: how generated tokens travel from a backend's thread to the caller.

use std::fmt;
use std::iter::FusedIterator;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, channel, sync_channel};
use std::time::Instant;

use crate::{BatchResult, CancelToken, Error, GenerateMetrics, Result, Token};

/// What travels over a stream's channel.
enum Event {
    Token(Token),
    Failed(Error),
    Finished(GenerateMetrics),
}

enum Source {
    Channel(Receiver<Event>),
    Iter(Box<dyn Iterator<Item = Result<Token>> + Send>),
    Done,
}

/// The tokens of one generate or chat call, as an iterator of `Result<Token>`.
///
/// * Tokens arrive as the backend produces them. The stream ends with `None` after a normal
///   finish; an `Err` is always the last item (a backend failure, [`Error::Cancelled`], or
///   [`Error::StreamAborted`] when the backend vanished without finishing).
/// * The stream has its own [`CancelToken`], a child of the one passed to the call: cancelling
///   either stops the backend at its next token, and the stream then yields
///   [`Error::Cancelled`] at once, without draining buffered tokens. A deadline on the token
///   ends a wait for the next token when it passes.
/// * Dropping the stream cancels its token (never the caller's), so the backend stops at its next
///   token. Read a stream to the end or drop it: one held but unread holds up its backend once
///   [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) tokens are buffered.
/// * After a normal end, [`metrics`](Self::metrics) gives the call's measurements when the
///   backend sent them.
///
/// Backends create one with [`channel`](Self::channel) and feed the [`TokenSink`] from their
/// own thread; fixed output can come from [`from_results`](Self::from_results) or `collect()`.
///
/// ```
/// use inference_core::{CancelToken, GenerateMetrics, Token, TokenStream};
/// let (sink, stream) = TokenStream::channel(CancelToken::new());
/// std::thread::spawn(move || {
///     sink.run(|sink| {
///         for (id, word) in ["Hello", ",", " world"].into_iter().enumerate() {
///             sink.send(Token::new(id as u32, word))?;
///         }
///         Ok(GenerateMetrics { generated_tokens: 3, ..Default::default() })
///     })
/// });
/// let done = stream.complete()?;
/// assert_eq!(done.text, "Hello, world");
/// assert_eq!(done.metrics.map(|m| m.generated_tokens), Some(3));
/// # Ok::<(), inference_core::Error>(())
/// ```
pub struct TokenStream {
    source: Source,
    cancel: CancelToken,
    metrics: Option<GenerateMetrics>,
}

/// The producing end of a [`TokenStream`], owned by the backend; `Send`, so it can move to the
/// thread that generates.
///
/// Call [`send`](Self::send) per token, then exactly one of [`finish`](Self::finish) or
/// [`fail`](Self::fail) (or let [`run`](Self::run) do it). Dropping the sink without either makes
/// the stream end with [`Error::StreamAborted`].
pub struct TokenSink {
    tx: Tx,
    cancel: CancelToken,
}

/// The sending half of a stream's channel: bounded (the producer waits) or not.
enum Tx {
    Bounded(SyncSender<Event>),
    Unbounded(Sender<Event>),
}

impl Tx {
    fn send(&self, event: Event) -> std::result::Result<(), Stopped> {
        match self {
            Tx::Bounded(tx) => tx.send(event).map_err(|_| Stopped),
            Tx::Unbounded(tx) => tx.send(event).map_err(|_| Stopped),
        }
    }
}

/// [`TokenSink::send`] failed: the consumer cancelled or dropped the stream. The producer should
/// stop; `?` converts it into [`Error::Cancelled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the consumer cancelled or dropped the stream")
    }
}

impl std::error::Error for Stopped {}

/// Everything a stream produced, gathered by [`TokenStream::complete`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    /// The tokens, in order.
    pub tokens: Vec<Token>,
    /// Their concatenated text.
    pub text: String,
    /// The call's measurements, when the backend sent them.
    pub metrics: Option<GenerateMetrics>,
}

impl TokenStream {
    /// How many tokens a [`channel`](Self::channel) buffers before the producer waits.
    pub const DEFAULT_CAPACITY: usize = 16;

    /// A connected sink and stream with [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY).
    ///
    /// `cancel` is the token passed to the call; the stream and the sink share a child of it.
    pub fn channel(cancel: CancelToken) -> (TokenSink, TokenStream) {
        Self::channel_with_capacity(cancel, Self::DEFAULT_CAPACITY)
    }

    /// A connected sink and stream that buffers `capacity` tokens (0: each
    /// [`send`](TokenSink::send) waits until the consumer takes the token).
    pub fn channel_with_capacity(cancel: CancelToken, capacity: usize) -> (TokenSink, TokenStream) {
        let (tx, rx) = sync_channel(capacity);
        Self::connected(cancel, Tx::Bounded(tx), rx)
    }

    /// A connected sink and stream whose buffer has no bound: [`send`](TokenSink::send) never
    /// waits. For a producer that serves many streams at once (a batch) and must not stall
    /// them all on one slow consumer; what it buffers is bounded by what it generates.
    pub fn unbounded_channel(cancel: CancelToken) -> (TokenSink, TokenStream) {
        let (tx, rx) = channel();
        Self::connected(cancel, Tx::Unbounded(tx), rx)
    }

    fn connected(cancel: CancelToken, tx: Tx, rx: Receiver<Event>) -> (TokenSink, TokenStream) {
        let cancel = cancel.child();
        let sink = TokenSink { tx, cancel: cancel.clone() };
        let stream = TokenStream { source: Source::Channel(rx), cancel, metrics: None };
        (sink, stream)
    }

    /// A stream that reads `items` lazily, stopping with [`Error::Cancelled`] when `cancel` is
    /// cancelled and after the first `Err`. It has no metrics.
    pub fn from_results<I>(cancel: CancelToken, items: I) -> TokenStream
    where
        I: IntoIterator<Item = Result<Token>>,
        I::IntoIter: Send + 'static,
    {
        TokenStream { source: Source::Iter(Box::new(items.into_iter())), cancel: cancel.child(), metrics: None }
    }

    /// This stream's own cancel token (a child of the call's); cancelling it stops the backend.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// Cancels this stream: the backend stops at its next token and the next item is
    /// [`Error::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The call's measurements, once the stream has ended normally and if the backend sent them.
    pub fn metrics(&self) -> Option<&GenerateMetrics> {
        self.metrics.as_ref()
    }

    /// Whether the stream has yielded its last item.
    pub fn is_finished(&self) -> bool {
        matches!(self.source, Source::Done)
    }

    /// Reads the stream to the end and concatenates the texts.
    ///
    /// # Errors
    ///
    /// The stream's error, if it ended with one.
    pub fn collect_text(self) -> Result<String> {
        self.complete().map(|c| c.text)
    }

    /// Reads the stream to the end: tokens, text and metrics.
    ///
    /// # Errors
    ///
    /// The stream's error, if it ended with one.
    pub fn complete(mut self) -> Result<Completion> {
        let mut done = Completion::default();
        for token in &mut self {
            let token = token?;
            done.text.push_str(&token.text);
            done.tokens.push(token);
        }
        done.metrics = self.metrics;
        Ok(done)
    }

    /// Reads the stream to the end, keeping the tokens produced before an error alongside it;
    /// handy for a backend whose batch generation runs prompts one at a time.
    pub fn into_batch_result(mut self) -> BatchResult {
        let mut result = BatchResult::default();
        for token in &mut self {
            match token {
                Ok(token) => result.tokens.push(token),
                Err(err) => result.error = Some(err),
            }
        }
        result
    }

    fn end(&mut self, last: Option<Result<Token>>) -> Option<Result<Token>> {
        // Dropping the receiver here also releases a producer blocked on a full buffer.
        self.source = Source::Done;
        last
    }
}

impl Iterator for TokenStream {
    type Item = Result<Token>;

    fn next(&mut self) -> Option<Result<Token>> {
        if matches!(self.source, Source::Done) {
            return None;
        }
        if self.cancel.is_cancelled() {
            return self.end(Some(Err(Error::Cancelled)));
        }
        let event = match &mut self.source {
            Source::Done => return None,
            Source::Iter(items) => {
                return match items.next() {
                    Some(Ok(token)) => Some(Ok(token)),
                    Some(Err(err)) => self.end(Some(Err(err))),
                    None => self.end(None),
                };
            }
            Source::Channel(rx) => match self.cancel.deadline() {
                None => rx.recv().ok(),
                Some(deadline) => match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => {
                        return self.end(Some(Err(Error::Cancelled)));
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            },
        };
        match event {
            Some(Event::Token(token)) => Some(Ok(token)),
            Some(Event::Failed(err)) => self.end(Some(Err(err))),
            Some(Event::Finished(metrics)) => {
                self.metrics = Some(metrics);
                self.end(None)
            }
            None if self.cancel.is_cancelled() => self.end(Some(Err(Error::Cancelled))),
            None => self.end(Some(Err(Error::StreamAborted))),
        }
    }
}

impl FusedIterator for TokenStream {}

impl Drop for TokenStream {
    fn drop(&mut self) {
        // Only the stream's own child token: the caller's token may be shared by other calls.
        self.cancel.cancel();
    }
}

impl FromIterator<Token> for TokenStream {
    /// A finished stream of fixed tokens, with no metrics and a fresh cancel token.
    fn from_iter<I: IntoIterator<Item = Token>>(tokens: I) -> Self {
        let tokens: Vec<Token> = tokens.into_iter().collect();
        Self::from_results(CancelToken::new(), tokens.into_iter().map(Ok))
    }
}

impl fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match self.source {
            Source::Channel(_) => "channel",
            Source::Iter(_) => "iterator",
            Source::Done => "finished",
        };
        f.debug_struct("TokenStream")
            .field("source", &source)
            .field("cancel", &self.cancel)
            .field("metrics", &self.metrics)
            .finish()
    }
}

impl TokenSink {
    /// Hands one token to the consumer, waiting while a bounded buffer is full.
    ///
    /// # Errors
    ///
    /// [`Stopped`] when the stream was cancelled (its token, or the call's) or dropped; the
    /// producer should stop generating and return.
    pub fn send(&self, token: Token) -> Result<(), Stopped> {
        if self.cancel.is_cancelled() {
            return Err(Stopped);
        }
        self.tx.send(Event::Token(token))
    }

    /// Ends the stream normally, with the call's measurements.
    pub fn finish(self, metrics: GenerateMetrics) {
        if !self.cancel.is_cancelled() {
            // A consumer that has gone needs nothing more.
            let _ = self.tx.send(Event::Finished(metrics));
        }
    }

    /// Ends the stream with `error` as its last item.
    pub fn fail(self, error: Error) {
        if !self.cancel.is_cancelled() {
            // A consumer that has gone needs nothing more.
            let _ = self.tx.send(Event::Failed(error));
        }
    }

    /// Runs `produce`, then finishes the stream with its metrics or fails it with its error.
    /// Inside `produce`, `sink.send(token)?` stops early when the consumer has gone. If `produce`
    /// panics, the stream ends with [`Error::StreamAborted`].
    pub fn run(self, produce: impl FnOnce(&TokenSink) -> Result<GenerateMetrics>) {
        match produce(&self) {
            Ok(metrics) => self.finish(metrics),
            Err(error) => self.fail(error),
        }
    }

    /// Whether the consumer cancelled or dropped the stream (or the call's token was cancelled);
    /// poll it during long steps such as prefill.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The stream's cancel token, for passing to lower layers.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }
}

impl fmt::Debug for TokenSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSink").field("cancel", &self.cancel).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn finished_stream_yields_tokens_then_none_and_metrics() {
        let (sink, mut stream) = TokenStream::channel(CancelToken::new());
        sink.send(Token::new(1, "a")).unwrap();
        sink.finish(GenerateMetrics { generated_tokens: 1, ..Default::default() });
        assert_eq!(stream.next().unwrap().unwrap(), Token::new(1, "a"));
        assert!(stream.metrics().is_none());
        assert!(stream.next().is_none());
        assert!(stream.is_finished());
        assert_eq!(stream.metrics().unwrap().generated_tokens, 1);
        assert!(stream.next().is_none());
    }

    #[test]
    fn unbounded_sink_never_waits_and_stops_when_the_stream_goes() {
        let (sink, mut stream) = TokenStream::unbounded_channel(CancelToken::new());
        // Far more than any bounded buffer here, with nobody reading: no send waits.
        for i in 0..(4 * TokenStream::DEFAULT_CAPACITY as u32) {
            sink.send(Token::new(i, "x")).unwrap();
        }
        assert_eq!(stream.next().unwrap().unwrap().id, 0);
        drop(stream);
        assert_eq!(sink.send(Token::new(0, "y")), Err(Stopped));
    }

    #[test]
    fn dropped_sink_yields_stream_aborted() {
        let (sink, mut stream) = TokenStream::channel(CancelToken::new());
        sink.send(Token::new(1, "a")).unwrap();
        drop(sink);
        assert!(stream.next().unwrap().is_ok());
        let err = stream.next().unwrap().unwrap_err();
        assert!(matches!(err, Error::StreamAborted));
        assert_eq!(err.to_string(), "backend stopped without finishing the stream");
        assert!(stream.next().is_none());
    }

    #[test]
    fn cancelled_call_token_stops_sink_and_stream() {
        let call = CancelToken::new();
        let (sink, mut stream) = TokenStream::channel(call.clone());
        sink.send(Token::new(1, "a")).unwrap();
        call.cancel();
        assert!(sink.is_cancelled());
        assert_eq!(sink.send(Token::new(2, "b")), Err(Stopped));
        assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
        assert!(stream.next().is_none());
    }

    #[test]
    fn dropping_stream_cancels_only_its_own_token() {
        let call = CancelToken::new();
        let (sink, stream) = TokenStream::channel(call.clone());
        drop(stream);
        assert!(sink.is_cancelled());
        assert!(!call.is_cancelled());
        assert_eq!(sink.send(Token::new(1, "a")), Err(Stopped));
    }

    #[test]
    fn passed_deadline_ends_a_wait_with_cancelled() {
        let (sink, mut stream) = TokenStream::channel(CancelToken::with_deadline(Instant::now()));
        assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
        drop(sink);
    }

    #[test]
    fn deadline_ends_a_wait_for_a_silent_producer() {
        let deadline = Instant::now() + Duration::from_millis(10);
        let (sink, mut stream) = TokenStream::channel(CancelToken::with_deadline(deadline));
        // The sink stays alive and silent; only the deadline can end the wait.
        assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
        assert!(sink.is_cancelled());
    }

    #[test]
    fn failed_stream_yields_the_error_last() {
        let (sink, stream) = TokenStream::channel(CancelToken::new());
        sink.send(Token::new(1, "a")).unwrap();
        sink.fail(Error::backend("fake", "boom"));
        let items: Vec<_> = stream.collect();
        assert_eq!(items.len(), 2);
        assert!(matches!(&items[1], Err(Error::Backend { message, .. }) if message == "boom"));
    }

    #[test]
    fn run_finishes_or_fails() {
        let (sink, stream) = TokenStream::channel(CancelToken::new());
        sink.run(|s| {
            s.send(Token::new(1, "x"))?;
            Ok(GenerateMetrics::default())
        });
        assert_eq!(stream.collect_text().unwrap(), "x");

        let (sink, stream) = TokenStream::channel(CancelToken::new());
        sink.run(|_| Err(Error::EmptyPrompt));
        assert!(matches!(stream.collect_text(), Err(Error::EmptyPrompt)));
    }

    #[test]
    fn from_iterator_and_from_results() {
        let stream: TokenStream = [Token::new(1, "a"), Token::new(2, "b")].into_iter().collect();
        let done = stream.complete().unwrap();
        assert_eq!(done.text, "ab");
        assert_eq!(done.tokens.len(), 2);
        assert_eq!(done.metrics, None);

        let items = vec![Ok(Token::new(1, "a")), Err(Error::Closed), Ok(Token::new(3, "c"))];
        let result = TokenStream::from_results(CancelToken::new(), items).into_batch_result();
        assert_eq!(result.text(), "a");
        assert!(matches!(result.error, Some(Error::Closed)));

        let cancel = CancelToken::new();
        let mut stream = TokenStream::from_results(cancel.clone(), (0..).map(|i| Ok(Token::new(i, "t"))));
        assert!(stream.next().unwrap().is_ok());
        cancel.cancel();
        assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
        assert!(stream.next().is_none());
    }

    #[test]
    fn stream_cancel_method() {
        let (sink, mut stream) = TokenStream::channel(CancelToken::new());
        stream.cancel();
        assert!(stream.cancel_token().is_cancelled());
        assert!(sink.is_cancelled());
        assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
    }

    #[test]
    fn debug_output() {
        let (sink, stream) = TokenStream::channel(CancelToken::new());
        assert!(format!("{stream:?}").starts_with("TokenStream { source: \"channel\""));
        assert!(format!("{sink:?}").starts_with("TokenSink { cancel: CancelToken"));
    }
}
