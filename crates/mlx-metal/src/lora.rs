// SPDX-License-Identifier: EUPL-1.2
//! LoRA adapters, in mlx-lm's format: the layer, attaching adapters to a
//! loaded model, adapter files, and fusing an adapter into the base weights.
//!
//! The layer itself, [`LoraLayer`], lives with the other layers in
//! [`crate::nn`] (re-exported here): it rides on an
//! [`nn::Linear`](crate::nn::Linear) and adds `scale · (dropout(x) A) B` to
//! its output. This module attaches adapters to a loaded model by mlx-lm
//! module path, reads and writes adapter files, and fuses.
//!
//! Adapter directories are mlx-lm's: `adapters.safetensors` holds
//! `model.layers.N.self_attn.q_proj.lora_a` / `.lora_b`, and
//! `adapter_config.json` holds `fine_tune_type`, `num_layers` (the adapted
//! blocks, counted from the top) and `lora_parameters` (`rank`, `scale`,
//! `dropout`, and `keys`, the layer-relative module paths; without `keys`
//! every linear layer of a block is adapted). Note that mlx-lm stores the
//! `scale` itself, not an `alpha`.
//!
//! [`fuse()`] folds the attached adapters into the weights, and
//! [`fuse_and_save`] writes a standalone model directory (durably, into a new
//! or empty directory unless told to replace one: [`IfExists`]).
//!
//! ```no_run
//! # fn main() -> mlx_metal::Result<()> {
//! use std::path::Path;
//! let mut loaded = mlx_metal::model::load(Path::new("models/smollm2"))?;
//! mlx_metal::lora::load_adapter(loaded.model.as_mut(), Path::new("adapters"))?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

mod fuse;

pub use fuse::{IfExists, check_fuse_output, dir_entries, fuse, fuse_and_save, listing};

use crate::model::LanguageModel;
use crate::nn::Linear;
pub use crate::nn::LoraLayer;
use mlx::io;
use mlx::ops;
use mlx::random;
use mlx::{Array, Dtype};
use mlx::{Error, Result};

/// The adapter weights file of an adapter directory.
pub const ADAPTER_FILE: &str = "adapters.safetensors";
/// The adapter config file of an adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// `lora_parameters` of `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraParameters {
    /// The rank.
    pub rank: i32,
    /// The factor applied to the update (mlx-lm stores this, not an alpha).
    pub scale: f32,
    /// Dropout on the adapter's input while training.
    #[serde(default)]
    pub dropout: f32,
    /// Layer-relative module paths to adapt (`self_attn.q_proj`); `None` adapts
    /// every linear layer of the adapted blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
}

/// `adapter_config.json` as mlx-lm reads and writes it. Fields this crate
/// does not use are kept in `extra` and written back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// `lora` (the only kind this crate runs; mlx-lm also has `dora` and `full`).
    #[serde(default = "default_fine_tune_type")]
    pub fine_tune_type: String,
    /// How many blocks are adapted, counted from the top; 0 or less means all
    /// of them (as mlx-lm's `layers[-max(n, 0):]`).
    pub num_layers: i64,
    /// Rank, scale, dropout and keys.
    pub lora_parameters: LoraParameters,
    /// Everything else in the file.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_fine_tune_type() -> String {
    "lora".into()
}

impl AdapterConfig {
    /// A LoRA config with no extra fields.
    pub fn new(num_layers: i64, lora_parameters: LoraParameters) -> AdapterConfig {
        AdapterConfig {
            fine_tune_type: default_fine_tune_type(),
            num_layers,
            lora_parameters,
            extra: serde_json::Map::new(),
        }
    }

    /// Reads `adapter_config.json` from `dir`.
    pub fn load(dir: &Path) -> Result<AdapterConfig> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            op: "load_adapter",
            path: path.clone(),
            source,
        })?;
        let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::Format {
            op: "load_adapter",
            path: path.clone(),
            message: e.to_string(),
        })?;
        if cfg.fine_tune_type != "lora" {
            return Err(Error::Format {
                op: "load_adapter",
                path,
                message: format!("fine_tune_type {:?} is not supported; only \"lora\" is", cfg.fine_tune_type),
            });
        }
        if cfg.lora_parameters.rank < 1 {
            return Err(Error::Format {
                op: "load_adapter",
                path,
                message: format!("lora_parameters.rank = {} must be at least 1", cfg.lora_parameters.rank),
            });
        }
        Ok(cfg)
    }

    /// Writes `adapter_config.json` into `dir` (pretty-printed, as mlx-lm does).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Format {
            op: "save_adapter",
            path: path.clone(),
            message: e.to_string(),
        })?;
        io::write_durable_bytes(&path, (text + "\n").as_bytes()).map_err(|e| match e {
            Error::Io { path, source, .. } => Error::Io { op: "save_adapter", path, source },
            other => other,
        })
    }
}

/// Splits `model.layers.3.self_attn.q_proj` into `(3, "self_attn.q_proj")`.
pub fn split_layer_path(path: &str) -> Option<(usize, &str)> {
    let at = path.find("layers.")?;
    let rest = &path[at + "layers.".len()..];
    let (num, key) = rest.split_once('.')?;
    Some((num.parse().ok()?, key))
}

/// Whether the layer-relative `key` (`self_attn.q_proj`) is selected by
/// `targets`, which may name full relative paths or last components (`q_proj`).
fn selected(key: &str, targets: Option<&[String]>) -> bool {
    match targets {
        None => true,
        Some(t) => t.iter().any(|k| k == key || key.rsplit('.').next() == Some(k.as_str())),
    }
}

/// The first adapted block when `num_layers` of `total` are adapted from the top.
fn first_layer(num_layers: i64, total: usize) -> usize {
    if num_layers <= 0 {
        return 0;
    }
    total.saturating_sub(usize::try_from(num_layers).unwrap_or(usize::MAX))
}

/// The linear layers an adapter config selects, with their paths, in layer order.
pub fn select_linears<'m>(
    model: &'m mut dyn LanguageModel,
    num_layers: i64,
    keys: Option<&[String]>,
) -> Vec<(String, &'m mut Linear)> {
    let total = model.num_layers();
    let first = first_layer(num_layers, total);
    model
        .linears_mut()
        .into_iter()
        .filter(|(path, _)| split_layer_path(path).is_some_and(|(i, key)| i >= first && selected(key, keys)))
        .collect()
}

/// The element type of new LoRA weights.
fn check_lora_dtype(dtype: Dtype) -> Result<()> {
    if !matches!(dtype, Dtype::Float32 | Dtype::Bfloat16 | Dtype::Float16) {
        return Err(Error::invalid("apply_lora", format!("LoRA weights must be floats, not {}", dtype.name())));
    }
    Ok(())
}

/// Attaches fresh adapters to the layers `config` selects, initialised as
/// mlx-lm does (`A ~ U(-1/√in, 1/√in)`, `B = 0`) from MLX's global random
/// state (seed it with [`random::seed`]), in `dtype`. Any adapter already
/// attached is removed first, so the model carries exactly this one. Returns
/// the adapted paths; `config.lora_parameters.keys` is set to the
/// layer-relative paths actually adapted, so the config can be saved as it is.
/// On error the model is left without an adapter.
pub fn apply_lora(model: &mut dyn LanguageModel, config: &mut AdapterConfig, dtype: Dtype) -> Result<Vec<String>> {
    check_lora_dtype(dtype)?;
    let p = config.lora_parameters.clone();
    if p.rank < 1 {
        return Err(Error::invalid("apply_lora", format!("rank {} must be at least 1", p.rank)));
    }
    remove_lora(model);
    match attach_fresh(model, config.num_layers, &p, dtype) {
        Ok((paths, keys)) => {
            config.lora_parameters.keys = Some(keys);
            Ok(paths)
        }
        Err(e) => {
            remove_lora(model);
            Err(e)
        }
    }
}

/// The body of [`apply_lora`]: the adapted paths and their layer-relative keys.
fn attach_fresh(
    model: &mut dyn LanguageModel,
    num_layers: i64,
    p: &LoraParameters,
    dtype: Dtype,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut paths = Vec::new();
    let mut keys = BTreeSet::new();
    for (path, linear) in select_linears(model, num_layers, p.keys.as_deref()) {
        let (out, inp) = linear.features()?;
        let bound = 1.0 / f64::from(inp).sqrt();
        let lo = Array::scalar_as(-bound, Dtype::Float32)?;
        let hi = Array::scalar_as(bound, Dtype::Float32)?;
        let a = random::uniform(&lo, &hi, &[inp, p.rank], Dtype::Float32, None)?;
        let b = ops::zeros(&[p.rank, out], Dtype::Float32)?;
        let (a, b) = if dtype == Dtype::Float32 { (a, b) } else { (ops::astype(&a, dtype)?, ops::astype(&b, dtype)?) };
        linear.lora = Some(LoraLayer::new(a, b, p.scale, p.dropout)?);
        if let Some((_, key)) = split_layer_path(&path) {
            keys.insert(key.to_string());
        }
        paths.push(path);
    }
    if paths.is_empty() {
        return Err(Error::invalid(
            "apply_lora",
            format!("no linear layer matches the keys {:?}", p.keys.clone().unwrap_or_default()),
        ));
    }
    Ok((paths, keys.into_iter().collect()))
}

/// Every adapter weight of the model by mlx-lm's name
/// (`model.layers.N.self_attn.q_proj.lora_a`), sorted by name.
pub fn lora_weights(model: &mut dyn LanguageModel) -> BTreeMap<String, Array> {
    let mut out = BTreeMap::new();
    for (path, linear) in model.linears_mut() {
        if let Some(l) = &linear.lora {
            out.insert(format!("{path}.lora_a"), l.a.clone());
            out.insert(format!("{path}.lora_b"), l.b.clone());
        }
    }
    out
}

/// Sets adapter weights by name (as [`lora_weights`] names them). Every name
/// must belong to an attached adapter and keep its shape.
pub fn set_lora_weights(model: &mut dyn LanguageModel, weights: &BTreeMap<String, Array>) -> Result<()> {
    let mut seen = 0usize;
    for (path, linear) in model.linears_mut() {
        let Some(l) = linear.lora.as_mut() else { continue };
        for (leaf, slot) in [("lora_a", &mut l.a), ("lora_b", &mut l.b)] {
            if let Some(w) = weights.get(&format!("{path}.{leaf}")) {
                if w.shape() != slot.shape() {
                    return Err(Error::invalid(
                        "set_lora_weights",
                        format!("{path}.{leaf}: shape {:?} does not match the adapter's {:?}", w.shape(), slot.shape()),
                    ));
                }
                *slot = w.clone();
                seen += 1;
            }
        }
    }
    if seen != weights.len() {
        let known = lora_weights(model);
        let unknown: Vec<&String> = weights.keys().filter(|k| !known.contains_key(*k)).collect();
        return Err(Error::invalid("set_lora_weights", format!("not adapter weights of this model: {unknown:?}")));
    }
    Ok(())
}

/// Turns dropout on or off in every attached adapter.
pub fn set_training(model: &mut dyn LanguageModel, training: bool) {
    for (_, linear) in model.linears_mut() {
        if let Some(l) = linear.lora.as_mut() {
            l.training = training;
        }
    }
}

/// Detaches every adapter; returns how many there were.
pub fn remove_lora(model: &mut dyn LanguageModel) -> usize {
    let mut n = 0;
    for (_, linear) in model.linears_mut() {
        if linear.lora.take().is_some() {
            n += 1;
        }
    }
    n
}

/// The number of adapter parameters attached.
pub fn lora_parameter_count(model: &mut dyn LanguageModel) -> usize {
    lora_weights(model).values().map(Array::size).sum()
}

/// Writes `adapters.safetensors` and `adapter_config.json` into `dir`
/// (created if needed), each durably ([`mlx::io::durable`]).
pub fn save_adapter(model: &mut dyn LanguageModel, dir: &Path, config: &AdapterConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { op: "save_adapter", path: dir.to_path_buf(), source })?;
    save_adapter_weights(model, &dir.join(ADAPTER_FILE), &BTreeMap::new())?;
    config.save(dir)
}

/// Writes the adapter weights alone to `file`, durably, with `metadata` in
/// the safetensors header (a trainer records the iteration there).
pub fn save_adapter_weights(
    model: &mut dyn LanguageModel,
    file: &Path,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let weights = lora_weights(model);
    if weights.is_empty() {
        return Err(Error::invalid("save_adapter", "the model has no adapter attached"));
    }
    io::save_safetensors(file, weights.iter().map(|(k, v)| (k.as_str(), v)), metadata)
}

fn adapter_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Format { op: "load_adapter", path: path.to_path_buf(), message: message.into() }
}

/// Loads the adapter directory `dir` (mlx-lm's layout) onto `model`,
/// replacing any adapter already attached. The file must hold exactly the
/// weights its config selects, with the model's shapes: an adapter trained
/// for another model fails with every mismatch listed, and the model is left
/// without an adapter.
pub fn load_adapter(model: &mut dyn LanguageModel, dir: &Path) -> Result<AdapterConfig> {
    let span = tracing::debug_span!("load_adapter", dir = %dir.display(), layers = tracing::field::Empty);
    let _enter = span.enter();
    let (config, tensors) = read_adapter_files(dir)?;
    remove_lora(model);
    let slots = fit_adapter(model, &config, &tensors, &dir.join(ADAPTER_FILE))?;
    let mut layers = 0;
    for ((_, linear), slot) in model.linears_mut().into_iter().zip(slots) {
        layers += usize::from(slot.is_some());
        linear.lora = slot;
    }
    span.record("layers", layers);
    Ok(config)
}

/// The adapter in `dir`, checked against `model` as [`load_adapter`] checks
/// it, but not attached: one slot per layer of
/// [`LanguageModel::linears_in_place`], in that order, `None` where the
/// adapter leaves the layer alone. The model is not changed (its fused decode
/// projections stay), so one model can hold several adapters' slots and swap
/// them in: the adapters served beside a model.
pub fn read_adapter(model: &mut dyn LanguageModel, dir: &Path) -> Result<(AdapterConfig, Vec<Option<LoraLayer>>)> {
    let _span = tracing::debug_span!("read_adapter", dir = %dir.display()).entered();
    let (config, tensors) = read_adapter_files(dir)?;
    let slots = fit_adapter(model, &config, &tensors, &dir.join(ADAPTER_FILE))?;
    Ok((config, slots))
}

/// `adapter_config.json` and the tensors of `adapters.safetensors` in `dir`.
fn read_adapter_files(dir: &Path) -> Result<(AdapterConfig, BTreeMap<String, Array>)> {
    if !dir.is_dir() {
        return Err(Error::Io {
            op: "load_adapter",
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "the adapter directory does not exist"),
        });
    }
    let config = AdapterConfig::load(dir)?;
    let loaded = io::load_safetensors(dir.join(ADAPTER_FILE))?;
    Ok((config, loaded.tensors))
}

/// The LoRA layer for each of `model`'s linear layers (in
/// [`LanguageModel::linears_in_place`]'s order) that `config` selects, from
/// `tensors`; every mismatch is listed in the error (`file` names the weights).
fn fit_adapter(
    model: &mut dyn LanguageModel,
    config: &AdapterConfig,
    tensors: &BTreeMap<String, Array>,
    file: &Path,
) -> Result<Vec<Option<LoraLayer>>> {
    let p = &config.lora_parameters;
    let first = first_layer(config.num_layers, model.num_layers());
    let mut errors = Vec::new();
    let mut used = BTreeSet::new();
    let mut slots = Vec::new();
    for (path, linear) in model.linears_in_place() {
        slots.push(None);
        if !split_layer_path(&path).is_some_and(|(i, key)| i >= first && selected(key, p.keys.as_deref())) {
            continue;
        }
        let (out, inp) = linear.features()?;
        let (ka, kb) = (format!("{path}.lora_a"), format!("{path}.lora_b"));
        let (Some(a), Some(b)) = (tensors.get(&ka), tensors.get(&kb)) else {
            errors.push(format!("  {path}: missing lora_a or lora_b"));
            continue;
        };
        used.insert(ka.clone());
        used.insert(kb.clone());
        if a.shape() != [inp, p.rank] {
            errors.push(format!("  {ka}: adapter shape {:?} does not match [{inp}, {}]", a.shape(), p.rank));
            continue;
        }
        if b.shape() != [p.rank, out] {
            errors.push(format!("  {kb}: adapter shape {:?} does not match [{}, {out}]", b.shape(), p.rank));
            continue;
        }
        if !a.dtype().is_float() || !b.dtype().is_float() {
            errors.push(format!("  {path}: adapter weights must be floats"));
            continue;
        }
        if let Some(slot) = slots.last_mut() {
            *slot = Some(LoraLayer::new(a.clone(), b.clone(), p.scale, p.dropout)?);
        }
    }
    for name in tensors.keys().filter(|k| !used.contains(*k)) {
        errors.push(format!("  {name}: not an adapter parameter in the model"));
    }
    if used.is_empty() && errors.is_empty() {
        errors.push("  the config selects no layer of this model".into());
    }
    if !errors.is_empty() {
        errors.sort();
        return Err(adapter_err(file, format!("the adapter does not fit this model:\n{}", errors.join("\n"))));
    }
    Ok(slots)
}
