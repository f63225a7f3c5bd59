// SPDX-License-Identifier: EUPL-1.2
//! Fuzzing mlx-metal's file readers with property tests, on the tiny fixture models:
//!
//! - `config.rs`: `config.json` — arbitrary and mutated JSON parsed alone, and mutated configs
//!   loaded with a fixture's weights (then run for a step when they load);
//! - `session.rs`: session files and prompt-cache files — their metadata and tensors mutated,
//!   and their bytes — loaded (then used for a turn when they load);
//! - `adapter.rs`: adapter directories — `adapter_config.json` and `adapters.safetensors`
//!   mutated — loaded onto a model (then run when they load).
//!
//! Every input must load or be refused with an error that says what is wrong; none may panic or
//! abort. Crashes found are kept in `regressions.rs` as plain tests with their exact inputs.
//! Cases per property are each module's `CASES` (`PROPTEST_CASES` raises them for a long run).

#[path = "../../../mlx/tests/common/mod.rs"]
mod common;

mod adapter;
mod config;
mod regressions;
mod session;

use std::collections::BTreeMap;

use mlx::{Array, Dtype, ops};
use mlx_metal::cache::LayerCache;
use mlx_metal::model::LanguageModel;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Runs `model` on two tokens with `caches` (fresh ones when `None`): a loaded model, session or
/// adapter must compute or fail with an error, and the logits must come out `[1, 2, vocab]`.
pub(crate) fn run_step(model: &dyn LanguageModel, caches: Option<&mut [LayerCache]>) -> Result<(), TestCaseError> {
    let mut fresh;
    let caches = match caches {
        Some(c) => c,
        None => {
            fresh = model.make_cache().map_err(fail)?;
            &mut fresh[..]
        }
    };
    let inputs = Array::from_slice(&[1i32, 2], &[1, 2]).map_err(fail)?;
    match model.forward(&inputs, caches).and_then(|logits| logits.eval().map(|()| logits)) {
        Ok(logits) => {
            let vocab = model.description().vocab_size as i32;
            proptest::prop_assert_eq!(logits.shape(), vec![1, 2, vocab]);
        }
        Err(e) => expect_message(&e)?,
    }
    Ok(())
}

/// An error must say something.
pub(crate) fn expect_message(e: &mlx::Error) -> Result<(), TestCaseError> {
    proptest::prop_assert!(!e.to_string().trim().is_empty(), "an error without a message: {e:?}");
    Ok(())
}

pub(crate) fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// One change to a file's tensors (`which` picks a tensor by index, modulo their number).
#[derive(Debug, Clone)]
pub(crate) enum TensorEdit {
    /// Replaced with zeros of another shape and dtype.
    Reshape(usize, Vec<i32>, usize),
    /// Cut to `n` along an axis (modulo its dimensions).
    Cut(usize, usize, i32),
    /// Cast to another dtype.
    Cast(usize, usize),
    /// Removed.
    Drop(usize),
    /// Renamed.
    Rename(usize, String),
}

/// The dtypes a tensor is changed to.
const DTYPES: &[Dtype] = &[Dtype::Float32, Dtype::Bfloat16, Dtype::Float16, Dtype::Int32, Dtype::Uint8];

/// Tensor edits; renamed tensors take names matching `names` (a regular expression) or any.
pub(crate) fn tensor_edit(names: &'static str) -> impl Strategy<Value = TensorEdit> {
    let t = any::<usize>();
    prop_oneof![
        2 => (t, prop::collection::vec(0i32..6, 0..5), 0..DTYPES.len()).prop_map(|(t, s, d)| TensorEdit::Reshape(t, s, d)),
        2 => (t, 0usize..4, 0i32..24).prop_map(|(t, a, n)| TensorEdit::Cut(t, a, n)),
        1 => (t, 0..DTYPES.len()).prop_map(|(t, d)| TensorEdit::Cast(t, d)),
        1 => t.prop_map(TensorEdit::Drop),
        1 => (t, prop_oneof![names, "[a-z._]{0,16}"]).prop_map(|(t, n)| TensorEdit::Rename(t, n)),
    ]
}

impl TensorEdit {
    /// Applies the edit to `tensors`.
    pub(crate) fn apply(&self, tensors: &mut BTreeMap<String, Array>) -> Result<(), TestCaseError> {
        let nth = |i: usize| tensors.keys().nth(i % tensors.len().max(1)).cloned();
        match self {
            TensorEdit::Reshape(t, shape, d) => {
                if let Some(name) = nth(*t) {
                    tensors.insert(name, ops::zeros(shape, DTYPES[*d]).map_err(fail)?);
                }
            }
            TensorEdit::Cut(t, axis, n) => {
                if let Some(name) = nth(*t)
                    && let Some(a) = tensors.get(&name)
                    && a.ndim() > 0
                {
                    let axis = (axis % a.ndim()) as i32;
                    let n = (*n).min(a.dim(axis).map_err(fail)?);
                    let cut = ops::slice_axis(a, axis, 0, n).map_err(fail)?;
                    tensors.insert(name, cut);
                }
            }
            TensorEdit::Cast(t, d) => {
                if let Some(name) = nth(*t)
                    && let Some(a) = tensors.get(&name)
                {
                    let cast = ops::astype(a, DTYPES[*d]).map_err(fail)?;
                    tensors.insert(name, cast);
                }
            }
            TensorEdit::Drop(t) => {
                if let Some(name) = nth(*t) {
                    tensors.remove(&name);
                }
            }
            TensorEdit::Rename(t, to) => {
                if let Some(a) = nth(*t).and_then(|name| tensors.remove(&name)) {
                    tensors.insert(to.clone(), a);
                }
            }
        }
        Ok(())
    }
}
