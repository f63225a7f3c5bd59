// SPDX-License-Identifier: EUPL-1.2
//! The backend options a load reads beside the scheduler's limits:
//! `quantised`, `prompt_cache_dir` and speculative decoding's.

use inference_core::{Error as CoreError, Result as CoreResult};

use super::scheduler::Speculator;
use crate::model;
use crate::speculative::{DraftSource, SpeculativeConfig};
use crate::tokenizer::Tokenizer;

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

/// The backend options of speculative decoding (`prompt_lookup`,
/// `draft_model`, `num_draft_tokens`; see [`SpeculativeConfig`]), with a
/// draft model's directory found and its tokenizer checked against the
/// model's: the guesses are token ids, so both must give every token the
/// same id. Not with tensor parallelism (the ranks would have to draft alike).
pub(super) fn speculative(
    options: &std::collections::BTreeMap<String, String>,
    tensor_parallel: bool,
    tokenizer: &Tokenizer,
) -> CoreResult<Option<SpeculativeConfig>> {
    let Some(mut config) = SpeculativeConfig::from_backend_options(options).map_err(super::core_err)? else {
        return Ok(None);
    };
    if tensor_parallel {
        return Err(CoreError::invalid_setting(
            "draft_model",
            "(speculative decoding)",
            "speculative decoding does not run with tensor parallelism",
        ));
    }
    if let DraftSource::Model(dir) = &config.source {
        let found = model::model_dir(dir).map_err(|e| {
            CoreError::invalid_setting("draft_model", dir.display(), format!("is not a model directory: {e}"))
        })?;
        let draft = Tokenizer::from_dir(&found).map_err(|e| {
            CoreError::invalid_setting("draft_model", dir.display(), format!("has no usable tokenizer: {e}"))
        })?;
        if let Some(why) = vocabulary_difference(tokenizer, &draft) {
            return Err(CoreError::invalid_setting(
                "draft_model",
                dir.display(),
                format!("has a different tokenizer from the model's ({why}); a draft model must share its tokenizer"),
            ));
        }
        config.source = DraftSource::Model(found);
    }
    Ok(Some(config))
}

/// How two tokenizers' vocabularies differ, if they do: sizes, or the first
/// token (in id order) that one lacks or numbers differently.
fn vocabulary_difference(model: &Tokenizer, draft: &Tokenizer) -> Option<String> {
    let (ours, theirs) = (model.hf().get_vocab(true), draft.hf().get_vocab(true));
    if ours.len() != theirs.len() {
        return Some(format!("{} tokens against the model's {}", theirs.len(), ours.len()));
    }
    let mut mine: Vec<(&String, &u32)> = ours.iter().collect();
    mine.sort_by_key(|(_, id)| **id);
    mine.into_iter().find(|(token, id)| theirs.get(*token) != Some(id)).map(|(token, id)| match theirs.get(token) {
        Some(other) => format!("{token:?} is token {other}, the model's {id}"),
        None => format!("it lacks {token:?}, the model's token {id}"),
    })
}

/// Loads what `config` drafts with, on the engine thread: the draft model
/// in the same compute type and quantised policy as the model.
pub(super) fn speculator(
    config: SpeculativeConfig,
    policy: model::dtype::DtypePolicy,
    quantised: model::dtype::QuantisedPolicy,
) -> mlx::Result<Speculator> {
    let draft = match &config.source {
        DraftSource::Model(dir) => {
            let _span = tracing::info_span!("load_draft_model", dir = %dir.display()).entered();
            Some(model::load_with_quantised(dir, None, policy, quantised)?.model)
        }
        DraftSource::PromptLookup { .. } => None,
    };
    Ok(Speculator { config, draft })
}
