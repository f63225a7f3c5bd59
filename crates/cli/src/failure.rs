// SPDX-License-Identifier: EUPL-1.2
//! What a subcommand reports when it fails: one message with every cause, printed once by `main`.

use std::fmt;

/// A subcommand's failure, already worded for the person at the terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure(String);

impl Failure {
    /// A failure with this message.
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    /// The message.
    pub(crate) fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<inference_core::Error> for Failure {
    /// The error with its whole chain of causes ([`inference_core::Error::report`]).
    fn from(err: inference_core::Error) -> Self {
        match err {
            // The library's message speaks to a programmer (cargo features, register()).
            inference_core::Error::BackendNotRegistered { name, registered } => Self(format!(
                "--backend {name}: no such backend; this mlxr has {} (`mlxr info` lists them)",
                registered.join(", ")
            )),
            err => Self(err.report()),
        }
    }
}

/// An I/O failure on the terminal's streams (a closed pipe, a full disk).
pub(crate) fn io(what: &str, err: std::io::Error) -> Failure {
    Failure::new(format!("{what}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_backend_is_named_as_a_flag() {
        let err = inference_core::Error::BackendNotRegistered {
            name: "torch".into(),
            registered: vec!["metal".into(), "mlx_lm".into()],
        };
        assert_eq!(
            Failure::from(err).message(),
            "--backend torch: no such backend; this mlxr has metal, mlx_lm (`mlxr info` lists them)"
        );
    }

    #[test]
    fn a_core_error_keeps_its_causes() {
        let err = inference_core::Error::LoadFailed {
            backend: "metal".into(),
            path: "/m".into(),
            source: Box::new(inference_core::Error::invalid_model("/m", "no config.json")),
        };
        let failure = Failure::from(err);
        assert_eq!(failure.message(), "backend \"metal\" failed to load model /m: invalid model at /m: no config.json");
        assert_eq!(failure.to_string(), failure.message());
    }

    #[test]
    fn io_names_what_failed() {
        let f = io("writing to standard output", std::io::Error::other("broken pipe"));
        assert_eq!(f.message(), "writing to standard output: broken pipe");
    }
}
