// SPDX-License-Identifier: EUPL-1.2
//! The process-wide registry behind the free functions. One test, so that nothing else in this
//! test binary touches the global state concurrently.

mod common;

use std::sync::Arc;

use common::TestBackend;
use inference_core::{Error, LoadSettings};

#[test]
fn free_functions_use_one_process_wide_registry() {
    assert!(inference_core::list().is_empty());
    assert!(matches!(inference_core::default_backend(), Err(Error::NoBackends)));

    let mlx_lm = Arc::new(TestBackend::available("mlx_lm"));
    assert!(inference_core::register(mlx_lm.clone()).is_none());
    inference_core::register(Arc::new(TestBackend::unavailable("metal", Some("no Metal device"))));
    assert_eq!(inference_core::list(), ["metal", "mlx_lm"]);
    assert_eq!(inference_core::get("mlx_lm").unwrap().name(), "mlx_lm");
    assert_eq!(inference_core::default_backend().unwrap().name(), "mlx_lm");
    assert_eq!(inference_core::global().list(), inference_core::list());

    let model = inference_core::load_model("/m", &LoadSettings::new()).unwrap();
    assert_eq!(model.model_type(), "minimal");
    assert_eq!(mlx_lm.load_count(), 1);

    let err = inference_core::load_model("/m", &LoadSettings::new().backend("metal")).err().unwrap();
    assert!(matches!(err, Error::BackendUnavailable { .. }));

    assert!(inference_core::global().unregister("metal").is_some());
    assert!(inference_core::global().unregister("mlx_lm").is_some());
    assert!(inference_core::list().is_empty());
}
