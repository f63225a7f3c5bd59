// SPDX-License-Identifier: EUPL-1.2
//! The errors a bridge process reports: the bridge's own `error` events mapped to API errors
//! (with the Python traceback as their cause), and the backend errors of the crash boundary.

use inference_core::Error;

use crate::BACKEND_NAME;
use crate::protocol::WireError;

/// A backend error of the `"mlx_lm"` backend.
pub(super) fn backend_error(message: impl Into<String>) -> Error {
    Error::backend(BACKEND_NAME, message)
}

/// A traceback that the bridge sent as the cause of an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Python traceback:\n{traceback}")]
pub struct PythonTraceback {
    /// The traceback as Python formatted it.
    pub traceback: String,
}

/// The error for a bridge `error` event (or a failed prompt of a batch).
pub(crate) fn bridge_error(error: WireError) -> Error {
    match error.kind.as_str() {
        "empty_prompt" => Error::EmptyPrompt,
        "unsupported" => Error::unsupported(BACKEND_NAME, error.operation.unwrap_or(error.message)),
        _ => match error.cause.filter(|c| !c.trim().is_empty()) {
            Some(traceback) => Error::backend_with_source(BACKEND_NAME, error.message, PythonTraceback { traceback }),
            None => backend_error(error.message),
        },
    }
}
