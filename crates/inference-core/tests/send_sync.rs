// SPDX-License-Identifier: EUPL-1.2
//! Compile-time checks that the public types are `Send`/`Sync` as promised, and that the traits
//! stay object safe. These tests pass by compiling.

use std::sync::Arc;

use inference_core::*;

fn assert_send_sync<T: Send + Sync + ?Sized>() {}
fn assert_send<T: Send + ?Sized>() {}
fn assert_static<T: 'static + ?Sized>() {}

/// `assert_send_sync::<T>()` for each type listed.
macro_rules! assert_all_send_sync {
    ($($t:ty),+ $(,)?) => {
        $(assert_send_sync::<$t>();)+
    };
}

#[test]
fn model_handles_and_backends_are_send_and_sync() {
    assert_all_send_sync!(
        dyn TextModel,
        Box<dyn TextModel>,
        Arc<dyn TextModel>,
        dyn Backend,
        Arc<dyn Backend>,
        dyn Adapter,
        Box<dyn Adapter>,
        Registry
    );
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
    assert_all_send_sync!(
        Token,
        Role,
        Message,
        GenerateSettings,
        LoadSettings,
        LoraConfig,
        ClassifyResult,
        BatchResult,
        GenerateMetrics,
        ModelInfo,
        AttentionSnapshot,
        DiscoveredModel,
        Completion
    );
}

#[test]
fn capability_traits_are_object_safe() {
    fn _inspector(_: &dyn AttentionInspector) {}
    fn _trainer(_: &dyn TrainableModel) {}
    fn _model(m: &dyn TextModel) -> (Option<&dyn AttentionInspector>, Option<&dyn TrainableModel>) {
        (m.attention_inspector(), m.trainer())
    }
}
