// SPDX-License-Identifier: EUPL-1.2
//! The backend options a load reads beside the scheduler's limits:
//! `quantised` and `prompt_cache_dir`.

use inference_core::{Error as CoreError, Result as CoreResult};

use crate::model;

/// The backend option `quantised`: what happens to a quantised checkpoint's
/// layers (`auto`, `keep`, `dequantise`; see [`model::dtype`]).
pub(crate) fn quantised_policy(
    options: &std::collections::BTreeMap<String, String>,
) -> CoreResult<model::dtype::QuantisedPolicy> {
    match options.get("quantised") {
        None => Ok(model::dtype::QuantisedPolicy::Auto),
        Some(v) => model::dtype::QuantisedPolicy::parse(v).ok_or_else(|| {
            CoreError::invalid_setting("quantised", format!("{v:?}"), "must be auto, keep or dequantise")
        }),
    }
}

/// The backend option `prompt_cache_dir`: where the prompt cache keeps its
/// entries across restarts (not with tensor parallelism: each rank holds a
/// shard of every cache).
pub(super) fn prompt_cache_dir(
    options: &std::collections::BTreeMap<String, String>,
    tensor_parallel: bool,
) -> CoreResult<Option<std::path::PathBuf>> {
    let Some(dir) = options.get("prompt_cache_dir") else { return Ok(None) };
    if dir.trim().is_empty() {
        return Err(CoreError::invalid_setting("prompt_cache_dir", "\"\"", "name a directory"));
    }
    if tensor_parallel {
        return Err(CoreError::invalid_setting(
            "prompt_cache_dir",
            dir,
            "a tensor-parallel job cannot keep its prompt cache on disk (each rank holds a shard of every cache)",
        ));
    }
    Ok(Some(std::path::PathBuf::from(dir)))
}
