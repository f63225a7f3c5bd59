// SPDX-License-Identifier: EUPL-1.2
//! What a training run saves, and taking it up again.
//!
//! A save is a pair that must stay together: the adapter weights and the
//! optimiser state (its moments and step). Each of the two files records the
//! iteration it belongs to in its safetensors metadata
//! ([`ITERATION_KEY`]), so a pair of two different saves is recognised and
//! never resumed silently. [`save_checkpoint`] writes them in an order that
//! leaves a consistent pair behind a crash at any point, and
//! [`find_resumable`] finds it (see their docs).
//!
//! A run that does not resume starts in an empty directory
//! ([`check_fresh_dir`]), so an adapter, its config and its checkpoints are
//! never overwritten by, or mixed with, another run's. A resumed run takes
//! the adapter's shape (rank, scale, dropout, layers, targets, element type)
//! from the saved `adapter_config.json` and weights: [`TrainConfig::adopt_saved_adapter`]
//! fills the settings a caller left to it, and [`check_matches`] refuses the
//! ones that contradict it, naming the setting and both values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use inference_core::{LoraConfig, LoraDType};
use mlx::{Dtype, io};
use mlx_metal::lora::{self, AdapterConfig};
use mlx_metal::model::LanguageModel;

use crate::error::{Error, TrainResult};
use crate::trainer::{STATE_FILE, Trainer};
use crate::{TrainConfig, lora_dtype};

/// The metadata key under which the adapter weights and the optimiser state
/// record the iteration they were saved at.
pub const ITERATION_KEY: &str = "iteration";

/// The numbered checkpoint of `iteration` in `dir` (`0000100_adapters.safetensors`).
pub fn numbered(dir: &Path, iteration: usize) -> PathBuf {
    dir.join(format!("{iteration:07}_{}", lora::ADAPTER_FILE))
}

/// Which adapter settings a caller chose itself; on resume the others are
/// taken from the saved adapter ([`TrainConfig::adopt_saved_adapter`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoraChoices {
    /// `lora.rank`.
    pub rank: bool,
    /// `lora.alpha`.
    pub alpha: bool,
    /// `lora.dropout`.
    pub dropout: bool,
    /// `lora.target_keys`.
    pub target_keys: bool,
    /// `lora.num_layers`.
    pub num_layers: bool,
    /// `lora.dtype`.
    pub dtype: bool,
}

impl LoraChoices {
    /// The adapter settings a [`TrainConfig`] written as JSON sets itself:
    /// the keys of its `lora` object (none when it has none, or is not JSON).
    pub fn in_json(config: &str) -> LoraChoices {
        let value: serde_json::Value = serde_json::from_str(config).unwrap_or_default();
        let has = |key: &str| value.get("lora").and_then(|l| l.get(key)).is_some();
        LoraChoices {
            rank: has("rank"),
            alpha: has("alpha"),
            dropout: has("dropout"),
            target_keys: has("target_keys"),
            num_layers: has("num_layers"),
            dtype: has("dtype"),
        }
    }
}

/// Refuses to start a new adapter in `dir` unless it is missing or empty.
///
/// # Errors
/// [`Error::Config`] for `adapter_path`, naming the directory and the first
/// few things in it, saying to resume or choose another directory.
pub fn check_fresh_dir(dir: &Path) -> TrainResult<()> {
    let entries = lora::dir_entries(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let Some(entries) = entries else { return Ok(()) };
    if entries.is_empty() {
        return Ok(());
    }
    Err(Error::config(
        "adapter_path",
        format!(
            "{} already holds {}; pass --resume (`resume`) to continue training the adapter there, or choose \
             another directory",
            dir.display(),
            lora::listing(&entries)
        ),
    ))
}

/// A saved pair to resume from.
#[derive(Debug, Clone, PartialEq)]
pub struct Resumable {
    /// The saved `adapter_config.json`.
    pub config: AdapterConfig,
    /// The adapter weights of the pair: `adapters.safetensors`, or the
    /// numbered checkpoint of the state's iteration when a save was cut short.
    pub weights: PathBuf,
    /// The optimiser state.
    pub state: PathBuf,
    /// The iteration both belong to.
    pub iteration: usize,
    /// The element type of the saved weights.
    pub dtype: Dtype,
    /// Why `weights` is not `adapters.safetensors`, when it is not.
    pub note: Option<String>,
}

/// The iteration a saved file records, if it records one.
fn recorded_iteration(meta: &BTreeMap<String, String>) -> Option<usize> {
    meta.get(ITERATION_KEY).and_then(|s| s.parse().ok())
}

fn nothing_to_resume(dir: &Path, why: &str) -> Error {
    Error::config(
        "resume",
        format!("{}: {why}, so there is nothing to resume; start without --resume in a new directory", dir.display()),
    )
}

/// Finds the pair to resume in `dir`: the optimiser state and the weights of
/// the same iteration. Those are `adapters.safetensors` when it records the
/// state's iteration; else (a crash between the state's save and the
/// adapter's, see [`save_checkpoint`]) the numbered checkpoint of that
/// iteration.
///
/// # Errors
/// Nothing to resume (no directory, config, state or weights), a file that
/// does not record its iteration, or weights and state of different
/// iterations with no checkpoint of the state's.
pub fn find_resumable(dir: &Path) -> TrainResult<Resumable> {
    if !dir.is_dir() {
        return Err(nothing_to_resume(dir, "the adapter directory does not exist"));
    }
    if !dir.join(lora::ADAPTER_CONFIG).is_file() {
        return Err(nothing_to_resume(dir, &format!("there is no {}", lora::ADAPTER_CONFIG)));
    }
    let config = AdapterConfig::load(dir)?;
    let state = dir.join(STATE_FILE);
    if !state.is_file() {
        return Err(nothing_to_resume(dir, &format!("there is no optimiser state ({STATE_FILE})")));
    }
    let unrecorded = |file: &Path| {
        Error::data(
            file,
            None,
            format!(
                "records no {ITERATION_KEY} in its metadata (saved by an older mlxr?), so the adapter weights that \
                 belong with it cannot be told; start a new run in another directory"
            ),
        )
    };
    let iteration =
        recorded_iteration(&io::read_safetensors_header(&state)?.metadata).ok_or_else(|| unrecorded(&state))?;
    let main = dir.join(lora::ADAPTER_FILE);
    let main_at = if main.is_file() {
        let header = io::read_safetensors_header(&main)?;
        Some((recorded_iteration(&header.metadata), header))
    } else {
        None
    };
    let (weights, header, note) = match main_at {
        Some((Some(i), header)) if i == iteration => (main, header, None),
        other => {
            let at = match &other {
                Some((Some(i), _)) => format!("is at iteration {i}"),
                Some((None, _)) => format!("records no {ITERATION_KEY}"),
                None => "is missing".to_owned(),
            };
            let fallback = numbered(dir, iteration);
            let header = fallback
                .is_file()
                .then(|| io::read_safetensors_header(&fallback))
                .transpose()?
                .filter(|h| recorded_iteration(&h.metadata) == Some(iteration));
            let Some(header) = header else {
                return Err(Error::data(
                    dir,
                    None,
                    format!(
                        "{} {at} but {STATE_FILE} is at iteration {iteration}, and there is no checkpoint {} of \
                         that iteration: the adapter and the optimiser state do not belong together",
                        lora::ADAPTER_FILE,
                        fallback.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                    ),
                ));
            };
            let note = format!(
                "{} {at} but the optimiser state is at iteration {iteration} (a save was cut short); resuming \
                 from {}",
                lora::ADAPTER_FILE,
                fallback.display()
            );
            (fallback, header, Some(note))
        }
    };
    let dtype = header
        .tensors
        .values()
        .next()
        .map(|t| t.dtype)
        .ok_or_else(|| Error::data(&weights, None, "holds no adapter weights"))?;
    Ok(Resumable { config, weights, state, iteration, dtype, note })
}

impl TrainConfig {
    /// For a resumed run: takes the adapter settings the caller did not
    /// choose (`chosen`) from the adapter saved in `adapter_path` — rank,
    /// alpha (the saved scale × rank), dropout, target keys and layers from
    /// its `adapter_config.json`, the element type from its weights. Settings
    /// the caller chose are left for [`train`](crate::train) to check against
    /// the saved adapter. Does nothing unless `resume` is set.
    ///
    /// # Errors
    /// As [`find_resumable`].
    pub fn adopt_saved_adapter(&mut self, chosen: LoraChoices) -> TrainResult<()> {
        if !self.resume {
            return Ok(());
        }
        let saved = find_resumable(&self.adapter_path)?;
        let p = &saved.config.lora_parameters;
        let l = &mut self.lora;
        if !chosen.rank {
            l.rank = usize::try_from(p.rank).unwrap_or(l.rank);
        }
        if !chosen.alpha {
            l.alpha = p.scale * p.rank as f32;
        }
        if !chosen.dropout {
            l.dropout = p.dropout;
        }
        if !chosen.target_keys
            && let Some(keys) = &p.keys
        {
            l.target_keys = keys.clone();
        }
        if !chosen.num_layers {
            l.num_layers = usize::try_from(saved.config.num_layers).ok().filter(|&n| n > 0);
        }
        if !chosen.dtype {
            l.dtype = match saved.dtype {
                Dtype::Bfloat16 => LoraDType::Bf16,
                _ => LoraDType::F32,
            };
        }
        Ok(())
    }
}

/// The adapted blocks from the top, for `num_layers` of `total` (0 or less: all).
fn adapted_blocks(num_layers: i64, total: usize) -> usize {
    usize::try_from(num_layers).ok().filter(|&n| n > 0).map_or(total, |n| n.min(total))
}

/// Checks a resumed run's adapter settings against the adapter it resumes
/// (`saved`, in `dir`), on `model`: each setting must be the saved one.
///
/// # Errors
/// [`Error::Config`] naming the first setting that differs, its value and
/// the saved one.
pub fn check_matches(
    lora_cfg: &LoraConfig,
    saved: &Resumable,
    model: &mut dyn LanguageModel,
    dir: &Path,
) -> TrainResult<()> {
    let p = &saved.config.lora_parameters;
    let differs = |field: &str, flag: &str, given: String, there: String| {
        Error::config(
            field,
            format!(
                "{flag} {given} differs from the adapter being resumed in {}, which has {there}; leave {flag} out \
                 to keep the saved value, or train a new adapter in another directory",
                dir.display()
            ),
        )
    };
    if i64::try_from(lora_cfg.rank).ok() != Some(i64::from(p.rank)) {
        return Err(differs("lora.rank", "--rank", lora_cfg.rank.to_string(), format!("rank {}", p.rank)));
    }
    let scale = lora_cfg.scale();
    if (scale - p.scale).abs() > 1e-6 * p.scale.abs().max(1.0) {
        return Err(differs(
            "lora.alpha",
            "--alpha",
            format!("{} (scale {scale} at rank {})", lora_cfg.alpha, lora_cfg.rank),
            format!("scale {} (alpha {})", p.scale, p.scale * p.rank as f32),
        ));
    }
    if lora_cfg.dropout != p.dropout {
        return Err(differs(
            "lora.dropout",
            "--dropout",
            lora_cfg.dropout.to_string(),
            format!("dropout {}", p.dropout),
        ));
    }
    let total = model.num_layers();
    let given_blocks = lora_cfg.num_layers.unwrap_or(total).min(total);
    let saved_blocks = adapted_blocks(saved.config.num_layers, total);
    if given_blocks != saved_blocks {
        let given = lora_cfg.num_layers.map_or_else(|| format!("unset (all {total} blocks)"), |n| n.to_string());
        return Err(differs(
            "lora.num_layers",
            "--num-layers",
            given,
            format!("the top {saved_blocks} of {total} blocks"),
        ));
    }
    let selected = |model: &mut dyn LanguageModel, n: i64, keys: Option<&[String]>| -> BTreeSet<String> {
        lora::select_linears(model, n, keys).into_iter().map(|(path, _)| path).collect()
    };
    let n = i64::try_from(saved_blocks).unwrap_or(i64::MAX);
    if selected(model, n, Some(&lora_cfg.target_keys)) != selected(model, n, p.keys.as_deref()) {
        return Err(differs(
            "lora.target_keys",
            "--targets",
            format!("{:?}", lora_cfg.target_keys),
            p.keys.as_ref().map_or_else(|| "every linear layer".to_owned(), |k| format!("{k:?}")),
        ));
    }
    let dtype = lora_dtype(lora_cfg.dtype);
    if dtype != saved.dtype {
        return Err(differs(
            "lora.dtype",
            "--lora-dtype",
            dtype.name().to_owned(),
            format!("{} weights", saved.dtype.name()),
        ));
    }
    Ok(())
}

/// Saves a checkpoint of `iteration`: the numbered weights, the optimiser
/// state and `adapters.safetensors`, each recording the iteration, each
/// written durably (synced and renamed into place), in that order.
///
/// Why that order: a crash can stop it between any two files, and resuming
/// needs weights and state of the same iteration. Before the state is
/// replaced, the previous `adapters.safetensors` and state still agree.
/// Once the state is replaced and before `adapters.safetensors` is, the
/// state's weights are already on disk as the numbered checkpoint, which
/// [`find_resumable`] takes instead. So a crash never loses the pair, and
/// `adapters.safetensors` — what inference and mlx-lm load — is always a
/// whole adapter of some save. Writing `adapters.safetensors` before the
/// state would leave, after a crash between them, new weights with old
/// moments and no older weights to go back to but the numbered copies.
///
/// `numbered_copy` is false for the save before the first step (no
/// numbered checkpoint of iteration 0, as mlx-lm writes none); the path
/// returned is the numbered checkpoint, or `adapters.safetensors` without one.
///
/// # Errors
/// An I/O or MLX failure, with the file named.
pub fn save_checkpoint(
    trainer: &Trainer,
    dir: &Path,
    iteration: usize,
    trained_tokens: usize,
    numbered_copy: bool,
) -> TrainResult<PathBuf> {
    let checkpoint = numbered(dir, iteration);
    if numbered_copy {
        trainer.save_weights(&checkpoint, iteration)?;
    }
    let mut extra = BTreeMap::new();
    extra.insert("trained_tokens".to_string(), trained_tokens.to_string());
    trainer.save_state(&dir.join(STATE_FILE), iteration, &extra)?;
    let main = dir.join(lora::ADAPTER_FILE);
    trainer.save_weights(&main, iteration)?;
    Ok(if numbered_copy { checkpoint } else { main })
}
