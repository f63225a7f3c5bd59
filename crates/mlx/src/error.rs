// SPDX-License-Identifier: EUPL-1.2
//! The crate's error type.

use std::path::PathBuf;

use crate::array::Dtype;

/// What can go wrong in MLX calls and in the safe layer around them.
///
/// Every variant names the operation (`op`) that failed, so an error from deep
/// inside a model still says which op it came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// MLX rejected the call (a C++ exception caught by the shim).
    #[error("{op}: {message}")]
    Mlx {
        /// The operation that failed.
        op: &'static str,
        /// MLX's own message.
        message: String,
    },
    /// The safe layer rejected the arguments before calling MLX.
    #[error("{op}: {message}")]
    InvalidArgument {
        /// The operation that was called.
        op: &'static str,
        /// What was wrong.
        message: String,
    },
    /// An array had another element type than the one asked for.
    #[error("{op}: expected {expected} but the array holds {got}")]
    DtypeMismatch {
        /// The operation that was called.
        op: &'static str,
        /// The dtype the caller asked for.
        expected: Dtype,
        /// The array's dtype.
        got: Dtype,
    },
    /// A Rust callback (a function handed to a transform) returned an error.
    #[error("{op}: callback failed: {source}")]
    Callback {
        /// The transform that ran the callback.
        op: &'static str,
        /// The callback's error.
        source: Box<Error>,
    },
    /// A file could not be read or written.
    #[error("{op}: {path}: {source}")]
    Io {
        /// The operation that was called.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A model directory cannot be loaded: bad or missing config, missing or
    /// misshapen tensors, unsupported architecture.
    #[error("{op}: {path}: {message}")]
    Model {
        /// The operation that was called.
        op: &'static str,
        /// The model directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file exists but its contents are not what the format requires.
    #[error("{op}: {path}: {message}")]
    Format {
        /// The operation that was called.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl Error {
    /// The operation the error is about.
    pub fn op(&self) -> &'static str {
        match self {
            Error::Mlx { op, .. }
            | Error::InvalidArgument { op, .. }
            | Error::DtypeMismatch { op, .. }
            | Error::Callback { op, .. }
            | Error::Io { op, .. }
            | Error::Model { op, .. }
            | Error::Format { op, .. } => op,
        }
    }

    /// An [`Error::InvalidArgument`] from `op` saying `message`.
    pub fn invalid(op: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument { op, message: message.into() }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
