// SPDX-License-Identifier: EUPL-1.2
//! Compile-time checks that the public types are `Send`/`Sync` as promised, and that the traits
//! stay object safe. These tests pass by compiling.

use std::sync::Arc;

use inference_core::*;

fn assert_send_sync<T: Send + Sync + ?Sized>() {}
fn assert_send<T: Send + ?Sized>() {}
fn assert_static<T: 'static + ?Sized>() {}

#[test]
fn model_handles_and_backends_are_send_and_sync() {
    assert_send_sync::<dyn TextModel>();
    assert_send_sync::<Box<dyn TextModel>>();
    assert_send_sync::<Arc<dyn TextModel>>();
    assert_send_sync::<dyn Backend>();
    assert_send_sync::<Arc<dyn Backend>>();
    assert_send_sync::<dyn Adapter>();
    assert_send_sync::<Box<dyn Adapter>>();
    assert_send_sync::<Registry>();
}

#[test]
fn errors_are_send_sync_and_static() {
    assert_send_sync::<Error>();
    assert_static::<Error>();
    assert_send_sync::<Stopped>();
    // Usable as a boxed standard error, for `?` into anyhow-style error types.
    let boxed: Box<dyn std::error::Error + Send + Sync + 'static> = Box::new(Error::Cancelled);
    assert_eq!(boxed.to_string(), "the operation was cancelled");
}

#[test]
fn streams_and_tokens_cross_threads() {
    assert_send::<TokenStream>();
    assert_send_sync::<TokenSink>();
    assert_send_sync::<CancelToken>();
    assert_send::<Discover>();
}

#[test]
fn data_types_are_send_and_sync() {
    assert_send_sync::<Token>();
    assert_send_sync::<Role>();
    assert_send_sync::<Message>();
    assert_send_sync::<GenerateSettings>();
    assert_send_sync::<LoadSettings>();
    assert_send_sync::<LoraConfig>();
    assert_send_sync::<ClassifyResult>();
    assert_send_sync::<BatchResult>();
    assert_send_sync::<GenerateMetrics>();
    assert_send_sync::<ModelInfo>();
    assert_send_sync::<AttentionSnapshot>();
    assert_send_sync::<DiscoveredModel>();
    assert_send_sync::<Completion>();
}

#[test]
fn capability_traits_are_object_safe() {
    fn _inspector(_: &dyn AttentionInspector) {}
    fn _trainer(_: &dyn TrainableModel) {}
    fn _model(m: &dyn TextModel) -> (Option<&dyn AttentionInspector>, Option<&dyn TrainableModel>) {
        (m.attention_inspector(), m.trainer())
    }
}
