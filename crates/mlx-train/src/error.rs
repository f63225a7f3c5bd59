// SPDX-License-Identifier: EUPL-1.2
//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong while preparing or running training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An MLX call, a model, a tokeniser or an adapter file failed.
    #[error(transparent)]
    Mlx(#[from] mlx_metal::Error),
    /// A data file is missing, empty or has a bad record; `line` is 1-based.
    #[error("{}: {message}", location(path, *line))]
    Data {
        /// The file.
        path: PathBuf,
        /// The line of the record, when the problem is one record.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A setting is out of range or inconsistent.
    #[error("invalid training setting {field}: {message}")]
    Config {
        /// The setting, as named in [`crate::TrainConfig`].
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn location(path: &std::path::Path, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("{}:{l}", path.display()),
        None => path.display().to_string(),
    }
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Config { field: field.into(), message: message.into() }
    }

    pub(crate) fn data(path: &std::path::Path, line: Option<usize>, message: impl Into<String>) -> Error {
        Error::Data { path: path.to_path_buf(), line, message: message.into() }
    }
}

impl From<inference_core::Error> for Error {
    fn from(e: inference_core::Error) -> Error {
        match e {
            inference_core::Error::InvalidSetting { name, value, reason } => {
                Error::Config { field: format!("lora.{name}"), message: format!("{value} {reason}") }
            }
            other => Error::Config { field: "lora".into(), message: other.to_string() },
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type TrainResult<T> = std::result::Result<T, Error>;
