// SPDX-License-Identifier: EUPL-1.2
//! The message of every error variant, and the source chain.

use std::error::Error as _;
use std::io;

use inference_core::{Error, UnavailableBackend};

#[test]
fn every_variant_has_a_lower_case_message_without_a_period() {
    let cases: Vec<(Error, &str)> = vec![
        (Error::invalid_setting("top_p", 0, "must be in (0, 1]"), "invalid setting top_p = 0: must be in (0, 1]"),
        (Error::Cancelled, "the operation was cancelled"),
        (Error::EmptyPrompt, "the prompt is empty"),
        (Error::unsupported("mlx_lm", "classification"), "backend \"mlx_lm\" does not support classification"),
        (Error::NoBackends, "no backends registered; call a backend crate's register() at start-up"),
        (
            Error::NoAvailableBackend {
                unavailable: vec![UnavailableBackend { name: "metal".into(), reason: "no Metal device".into() }],
            },
            "no backend is available on this machine (metal: no Metal device)",
        ),
        (
            Error::BackendNotRegistered { name: "metal".into(), registered: vec![] },
            "backend \"metal\" is not registered (registered: none); enable the cargo feature of \
             the crate that provides it and call that crate's register() at start-up",
        ),
        (
            Error::BackendUnavailable { name: "metal".into(), reason: "no Metal device".into() },
            "backend \"metal\" is not available on this machine: no Metal device",
        ),
        (
            Error::LoadFailed { backend: "metal".into(), path: "/m".into(), source: Box::new(Error::EmptyPrompt) },
            "backend \"metal\" failed to load model /m",
        ),
        (Error::io("/m/config.json", io::Error::from(io::ErrorKind::NotFound)), "cannot access /m/config.json"),
        (Error::invalid_model("/m", "no safetensors files"), "invalid model at /m: no safetensors files"),
        (Error::backend("metal", "out of memory"), "backend \"metal\": out of memory"),
        (Error::Closed, "the model has been closed"),
        (Error::StreamAborted, "backend stopped without finishing the stream"),
    ];
    for (err, expected) in cases {
        let message = err.to_string();
        assert_eq!(message, expected);
        assert!(message.starts_with(|c: char| c.is_lowercase()), "{message}");
        assert!(!message.ends_with('.'), "{message}");
    }
}

#[test]
fn sources_are_chained_not_repeated() {
    let io = io::Error::other("disk on fire");
    let err = Error::backend_with_source("metal", "cannot read weights", io);
    assert_eq!(err.to_string(), "backend \"metal\": cannot read weights");
    assert_eq!(err.source().unwrap().to_string(), "disk on fire");
    assert_eq!(err.report(), "backend \"metal\": cannot read weights: disk on fire");
    assert!(Error::backend("metal", "x").source().is_none());
    assert_eq!(Error::Closed.report(), "the model has been closed");
}

#[test]
fn stopped_converts_to_cancelled() {
    let err: Error = inference_core::Stopped.into();
    assert!(err.is_cancelled());
    assert!(!Error::Closed.is_cancelled());
    assert_eq!(inference_core::Stopped.to_string(), "the consumer cancelled or dropped the stream");
}
