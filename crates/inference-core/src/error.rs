// SPDX-License-Identifier: EUPL-1.2
//! The crate's one error type.

use std::fmt::Write as _;
use std::path::PathBuf;

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error from a backend's own dependencies (an FFI status, a subprocess, a parser).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong behind the inference API.
///
/// Messages start in lower case, carry no trailing period and never repeat the message of
/// their [`source`](std::error::Error::source); use [`Error::report`] to print the whole chain
/// on one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is outside the range that the operation accepts.
    #[error("invalid setting {name} = {value}: {reason}")]
    InvalidSetting {
        /// The setting's field name, for example `temperature` or `stop_strings[1]`.
        name: String,
        /// The rejected value as the caller gave it.
        value: String,
        /// What the allowed values are.
        reason: String,
    },

    /// The call's [`CancelToken`](crate::CancelToken) was cancelled, its deadline passed, or the
    /// consumer dropped the stream.
    #[error("the operation was cancelled")]
    Cancelled,

    /// The prompt (or message list) is empty, or nothing remained of it after tokenisation.
    #[error("the prompt is empty")]
    EmptyPrompt,

    /// The backend does not implement this operation.
    #[error("backend \"{backend}\" does not support {operation}")]
    Unsupported {
        /// The backend's registered name.
        backend: String,
        /// The operation, as a noun phrase (`classification`, `attention inspection`).
        operation: String,
    },

    /// The registry holds no backend at all.
    #[error("no backends registered; call a backend crate's register() at start-up")]
    NoBackends,

    /// Backends are registered but none of them can run on this machine.
    #[error("no backend is available on this machine ({})", list_unavailable(.unavailable))]
    NoAvailableBackend {
        /// Every registered backend with the reason it is unavailable, sorted by name.
        unavailable: Vec<UnavailableBackend>,
    },

    /// A backend was asked for by name but nothing registered that name.
    #[error(
        "backend \"{name}\" is not registered (registered: {}); enable the cargo feature of the \
         crate that provides it and call that crate's register() at start-up",
        list_names(.registered)
    )]
    BackendNotRegistered {
        /// The requested name.
        name: String,
        /// The names that are registered, sorted.
        registered: Vec<String>,
    },

    /// The backend is registered but cannot run on this machine.
    #[error("backend \"{name}\" is not available on this machine: {reason}")]
    BackendUnavailable {
        /// The backend's name.
        name: String,
        /// Why it is unavailable, as the backend reported it.
        reason: String,
    },

    /// The backend's `load_model` returned an error.
    #[error("backend \"{backend}\" failed to load model {}", .path.display())]
    LoadFailed {
        /// The backend's name.
        backend: String,
        /// The path as the caller passed it.
        path: PathBuf,
        /// What the backend reported.
        source: Box<Error>,
    },

    /// A file or directory could not be read or written.
    #[error("cannot access {}", .path.display())]
    Io {
        /// The path that the operation was working on.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// A model directory or file is present but unusable.
    #[error("invalid model at {}: {reason}", .path.display())]
    InvalidModel {
        /// The model's path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A backend-specific failure.
    #[error("backend \"{backend}\": {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What went wrong, in the backend's words.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// The model was closed; it accepts no further calls.
    #[error("the model has been closed")]
    Closed,

    /// A backend dropped its [`TokenSink`](crate::TokenSink) without finishing or failing the
    /// stream (for example, its thread panicked), so the output may be incomplete.
    #[error("backend stopped without finishing the stream")]
    StreamAborted,
}

/// A registered backend that cannot run here, as listed by [`Error::NoAvailableBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnavailableBackend {
    /// The backend's name.
    pub name: String,
    /// Why it is unavailable.
    pub reason: String,
}

fn list_names(names: &[String]) -> String {
    if names.is_empty() { "none".to_owned() } else { names.join(", ") }
}

fn list_unavailable(list: &[UnavailableBackend]) -> String {
    let mut out = String::new();
    for (i, b) in list.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{}: {}", b.name, b.reason);
    }
    out
}

impl Error {
    /// An [`Error::InvalidSetting`].
    pub fn invalid_setting(name: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> Self {
        Self::InvalidSetting { name: name.into(), value: value.to_string(), reason: reason.into() }
    }

    /// An [`Error::Unsupported`].
    pub fn unsupported(backend: impl Into<String>, operation: impl Into<String>) -> Self {
        Self::Unsupported { backend: backend.into(), operation: operation.into() }
    }

    /// An [`Error::Backend`] without an underlying error.
    pub fn backend(backend: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Backend { backend: backend.into(), message: message.into(), source: None }
    }

    /// An [`Error::Backend`] that wraps an underlying error.
    pub fn backend_with_source(
        backend: impl Into<String>,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Backend { backend: backend.into(), message: message.into(), source: Some(source.into()) }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    /// An [`Error::InvalidModel`] for `path`.
    pub fn invalid_model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::InvalidModel { path: path.into(), reason: reason.into() }
    }

    /// Whether this is [`Error::Cancelled`].
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Self::Cancelled)
    }

    /// This error and every [`source`](std::error::Error::source) below it, joined by `": "`.
    ///
    /// ```
    /// use inference_core::Error;
    /// let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
    /// let err = Error::LoadFailed {
    ///     backend: "metal".into(),
    ///     path: "/models/x".into(),
    ///     source: Box::new(Error::io("/models/x/config.json", io)),
    /// };
    /// assert_eq!(
    ///     err.report(),
    ///     "backend \"metal\" failed to load model /models/x: \
    ///      cannot access /models/x/config.json: no such file"
    /// );
    /// ```
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut next = std::error::Error::source(self);
        while let Some(err) = next {
            let _ = write!(out, ": {err}");
            next = err.source();
        }
        out
    }
}

/// A producer's [`TokenSink::send`](crate::TokenSink::send) failed because the consumer cancelled
/// or dropped the stream; converting it gives [`Error::Cancelled`].
impl From<crate::stream::Stopped> for Error {
    fn from(_: crate::stream::Stopped) -> Self {
        Self::Cancelled
    }
}
