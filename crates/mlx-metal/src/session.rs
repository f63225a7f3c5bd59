// SPDX-License-Identifier: EUPL-1.2
//! The model side of a chat session: per-layer caches that follow a token
//! sequence across turns, and their file format.
//!
//! A turn gives the whole token sequence so far. [`SessionCache::prepare`]
//! keeps the longest common prefix with what the caches hold (trimming the
//! rest) and returns how many tokens need no prefill; after the turn,
//! [`SessionCache::record`] notes what the caches hold now (the prompt and
//! the generated tokens that were fed back). A rotating (sliding-window)
//! cache that has wrapped cannot be trimmed: the positions it rotated out are
//! gone, so a divergence then starts again from an empty cache.
//!
//! # File format
//!
//! One safetensors file: `layers.{i}.keys` / `layers.{i}.values` per layer
//! (`[1, H_kv, L, D]`, the kept positions in chronological order) and string
//! metadata: `format` = `mlxr-session`, `version` = `1`, `model` (the
//! [`Fingerprint`] as JSON), `tokens` (the token ids as a JSON array) and
//! `layers` (per layer, its kind and, for rotating caches, offset, window
//! and kept prefix, as JSON).
//!
//! The prompt cache's entries on disk ([`save_rows`], [`load_rows`]) are
//! files of the same format whose layers are of kind `row`: the kept
//! positions of a one-row batch cache (all of them, or at least a
//! sliding-window layer's window) with the position and window, and an
//! `origin` entry (the adapter that shaped them).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache::{BatchKvCache, KvCache, LayerCache, RotatingKvCache};
use crate::model::LanguageModel;
use mlx::Array;
use mlx::io;
use mlx::{Error, Result};

const FORMAT: &str = "mlxr-session";
const VERSION: &str = "1";

/// What identifies the model a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// `model_type`.
    pub architecture: String,
    /// Decoder layers.
    pub num_layers: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// A hash (FNV-1a, hex) of config.json's bytes.
    pub config_hash: String,
    /// The type the model computes in (its caches hold keys and values of
    /// that type); empty when unknown.
    #[serde(default)]
    pub dtype: String,
}

impl Fingerprint {
    /// The fingerprint of a model directory's description and config.json.
    pub fn new(desc: &crate::model::Description, config_json: &[u8]) -> Fingerprint {
        let h = crate::fnv1a64(config_json.iter().copied());
        Fingerprint {
            architecture: desc.architecture.clone(),
            num_layers: desc.num_layers,
            hidden_size: desc.hidden_size,
            vocab_size: desc.vocab_size,
            config_hash: format!("{h:016x}"),
            dtype: desc.compute_dtype.clone().unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum LayerKind {
    Standard,
    Rotating {
        offset: i32,
        max_size: i32,
        keep: i32,
    },
    /// A one-row batch cache (a prompt-cache entry): its last kept positions of `position`.
    Row {
        position: i32,
        window: Option<i32>,
    },
}

/// What a layer's keys and values look like for a model: `[1, heads, L, dim]`
/// of `dtype`, within `window` positions for a sliding-window layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// Key-value heads.
    pub heads: i32,
    /// Head dimension.
    pub dim: i32,
    /// The cache's element type.
    pub dtype: mlx::Dtype,
    /// A sliding-window layer's window.
    pub window: Option<i32>,
}

/// The caches of a session and the tokens they hold.
pub struct SessionCache {
    caches: Vec<LayerCache>,
    tokens: Vec<u32>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl SessionCache {
    /// Empty caches for `model`.
    pub fn new(model: &dyn LanguageModel) -> Result<SessionCache> {
        Ok(SessionCache { caches: model.make_cache()?, tokens: Vec::new() })
    }

    /// The tokens the caches hold.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The caches, one per layer.
    pub fn caches_mut(&mut self) -> &mut Vec<LayerCache> {
        &mut self.caches
    }

    /// Forgets everything.
    pub fn reset(&mut self, model: &dyn LanguageModel) -> Result<()> {
        self.caches = model.make_cache()?;
        self.tokens.clear();
        Ok(())
    }

    /// Makes the caches hold a prefix of `ids` (non-empty) that leaves at
    /// least one token to feed, and returns its length.
    pub fn prepare(&mut self, model: &dyn LanguageModel, ids: &[u32]) -> Result<usize> {
        if ids.is_empty() {
            return Err(Error::invalid("session", "the prompt has no tokens"));
        }
        let keep = common_prefix(&self.tokens, ids).min(ids.len() - 1);
        let drop = self.tokens.len() - keep;
        if drop > 0 {
            if keep == 0 || !self.caches.iter().all(LayerCache::is_trimmable) {
                self.reset(model)?;
                return Ok(0);
            }
            for c in &mut self.caches {
                c.trim(drop as i32);
            }
            self.tokens.truncate(keep);
        }
        Ok(keep)
    }

    /// Records what the caches hold after a turn over `ids` that fed `fed`
    /// generated tokens back. When the caches disagree with that (an error
    /// part-way), the session starts again.
    pub fn record(&mut self, model: &dyn LanguageModel, ids: &[u32], fed: &[u32]) -> Result<()> {
        let offsets: Vec<i32> = self.caches.iter().map(LayerCache::offset).collect();
        let held = offsets.first().copied().unwrap_or(0).max(0) as usize;
        if offsets.iter().any(|&o| o as usize != held) || held > ids.len() + fed.len() {
            return self.reset(model);
        }
        self.tokens = ids.iter().chain(fed).copied().take(held).collect();
        Ok(())
    }

    /// Saves the caches and tokens to `path` (replaced atomically).
    pub fn save(&self, path: &Path, fingerprint: &Fingerprint) -> Result<()> {
        let mut tensors: Vec<(String, Array)> = Vec::new();
        let mut kinds = Vec::with_capacity(self.caches.len());
        for (i, c) in self.caches.iter().enumerate() {
            let (kind, kv) = match c {
                LayerCache::Standard(c) => {
                    (LayerKind::Standard, if c.offset() > 0 { Some(c.keys_and_values()?) } else { None })
                }
                LayerCache::Rotating(c) => (
                    LayerKind::Rotating { offset: c.offset(), max_size: c.max_size(), keep: c.keep() },
                    if c.offset() > 0 { Some(c.ordered()?) } else { None },
                ),
                LayerCache::Batch(_) => {
                    return Err(Error::invalid("save_session", "a batch cache cannot be saved as a session"));
                }
            };
            if let Some((k, v)) = kv {
                tensors.push((format!("layers.{i}.keys"), k));
                tensors.push((format!("layers.{i}.values"), v));
            }
            kinds.push(kind);
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".to_owned(), FORMAT.to_owned());
        meta.insert("version".to_owned(), VERSION.to_owned());
        meta.insert("model".to_owned(), to_json(fingerprint)?);
        meta.insert("tokens".to_owned(), to_json(&self.tokens)?);
        meta.insert("layers".to_owned(), to_json(&kinds)?);
        io::save_safetensors(path, tensors.iter().map(|(k, a)| (k.as_str(), a)), &meta)
    }

    /// Loads a session saved by [`Self::save`] for the model `fingerprint`
    /// names; `model` gives the expected cache layout.
    pub fn load(path: &Path, model: &dyn LanguageModel, fingerprint: &Fingerprint) -> Result<SessionCache> {
        let bad = |message: String| Error::Format { op: "load_session", path: path.to_path_buf(), message };
        let (tokens, kinds, _) = read_header(path, fingerprint)?;
        let fresh = model.make_cache()?;
        if kinds.len() != fresh.len() {
            return Err(bad(format!("{} layers saved, the model has {}", kinds.len(), fresh.len())));
        }
        let shapes = key_shapes(model)?;
        let mut loaded = io::load_safetensors(path)?;
        let mut caches = Vec::with_capacity(kinds.len());
        for (i, ((kind, expected), &(heads, dim, dtype))) in kinds.into_iter().zip(fresh).zip(&shapes).enumerate() {
            let k = loaded.tensors.remove(&format!("layers.{i}.keys"));
            let v = loaded.tensors.remove(&format!("layers.{i}.values"));
            if let (Some(k), Some(v)) = (&k, &v) {
                check_layer(k, v, (heads, dim, dtype)).map_err(|why| bad(format!("layer {i}: {why}")))?;
            }
            let cache = match (kind, expected, k, v) {
                (LayerKind::Standard, LayerCache::Standard(_), Some(k), Some(v)) => {
                    LayerCache::Standard(KvCache::from_state(k, v)?)
                }
                (LayerKind::Standard, LayerCache::Standard(c), None, None) => LayerCache::Standard(c),
                (LayerKind::Rotating { offset, max_size, keep }, LayerCache::Rotating(c), k, v)
                    if max_size == c.max_size() =>
                {
                    match (k, v) {
                        (Some(k), Some(v)) => {
                            LayerCache::Rotating(RotatingKvCache::from_state(k, v, offset, max_size, keep)?)
                        }
                        (None, None) if offset == 0 => LayerCache::Rotating(c),
                        _ => return Err(bad(format!("layer {i}: keys or values are missing"))),
                    }
                }
                _ => return Err(bad(format!("layer {i}: the saved cache does not fit this model's layer"))),
            };
            caches.push(cache);
        }
        if let Some(extra) = loaded.tensors.keys().next() {
            return Err(bad(format!("unexpected tensor {extra:?}")));
        }
        let held = caches.first().map_or(0, LayerCache::offset);
        if caches.iter().any(|c| c.offset() != held) || held as usize != tokens.len() {
            return Err(bad(format!("the caches hold {held} positions but {} tokens are recorded", tokens.len())));
        }
        Ok(SessionCache { caches, tokens })
    }
}

/// Each layer's key heads, head size and element type for `model`: read off fresh caches after
/// one token (a graph that is built but never run).
fn key_shapes(model: &dyn LanguageModel) -> Result<Vec<(i32, i32, mlx::Dtype)>> {
    let mut caches = model.make_cache()?;
    model.forward(&mlx::ops::zeros(&[1, 1], mlx::Dtype::Int32)?, &mut caches)?;
    caches
        .iter()
        .map(|c| {
            let keys =
                c.state().into_iter().next().ok_or_else(|| Error::invalid("load_session", "a cache holds nothing"))?;
            let s = keys.shape();
            Ok((s[1], s[s.len() - 1], keys.dtype()))
        })
        .collect()
}

/// Whether a saved layer's keys and values fit the model's `[1, heads, L, dim]` of `dtype`, and
/// hold only finite numbers (a NaN or an infinity would change every answer after it silently).
fn check_layer(
    keys: &Array,
    values: &Array,
    (heads, dim, dtype): (i32, i32, mlx::Dtype),
) -> std::result::Result<(), String> {
    for (what, a) in [("keys", keys), ("values", values)] {
        let s = a.shape();
        let fits = s.len() == 4
            && s[0] == 1
            && s[1] == heads
            && s[3] == dim
            && s[2] == keys.shape().get(2).copied().unwrap_or(-1);
        if !fits {
            return Err(format!("{what} of shape {s:?} do not fit this model's [1, {heads}, L, {dim}]"));
        }
        if a.dtype() != dtype {
            return Err(format!("{what} are {:?}; this model's cache holds {dtype:?}", a.dtype()));
        }
        let any_bad = || -> Result<bool> {
            let bad = mlx::ops::logical_or(&mlx::ops::isnan(a)?, &mlx::ops::isinf(a)?)?;
            mlx::ops::any_all(&bad, false)?.item::<bool>()
        };
        if any_bad().map_err(|e| e.to_string())? {
            return Err(format!("{what} hold NaN or infinite values"));
        }
    }
    Ok(())
}

/// A session file's tokens, layer kinds and metadata.
type Header = (Vec<u32>, Vec<LayerKind>, BTreeMap<String, String>);

/// Checks a session file's format, version and model; returns its header.
fn read_header(path: &Path, fingerprint: &Fingerprint) -> Result<Header> {
    let bad = |message: String| Error::Format { op: "load_session", path: path.to_path_buf(), message };
    let meta = io::read_safetensors_header(path)?.metadata;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad("not a session file (its metadata has no format = \"mlxr-session\")".into()));
    }
    if meta.get("version").map(String::as_str) != Some(VERSION) {
        return Err(bad(format!("session format version {:?} is not {VERSION}", meta.get("version"))));
    }
    let field = |k: &str| meta.get(k).ok_or_else(|| bad(format!("the metadata has no {k:?}")));
    let saved: Fingerprint =
        serde_json::from_str(field("model")?).map_err(|e| bad(format!("bad \"model\" metadata: {e}")))?;
    if &saved != fingerprint {
        return Err(Error::Model {
            op: "load_session",
            path: path.to_path_buf(),
            message: format!(
                "the session was saved from another model ({} with {} layers, hidden size {}, vocabulary {}, config \
                 {}, computing in {}), not this one ({} with {} layers, hidden size {}, vocabulary {}, config {}, \
                 computing in {})",
                saved.architecture,
                saved.num_layers,
                saved.hidden_size,
                saved.vocab_size,
                saved.config_hash,
                or_unknown(&saved.dtype),
                fingerprint.architecture,
                fingerprint.num_layers,
                fingerprint.hidden_size,
                fingerprint.vocab_size,
                fingerprint.config_hash,
                or_unknown(&fingerprint.dtype),
            ),
        });
    }
    let tokens: Vec<u32> =
        serde_json::from_str(field("tokens")?).map_err(|e| bad(format!("bad \"tokens\" metadata: {e}")))?;
    let kinds: Vec<LayerKind> =
        serde_json::from_str(field("layers")?).map_err(|e| bad(format!("bad \"layers\" metadata: {e}")))?;
    Ok((tokens, kinds, meta))
}

fn or_unknown(dtype: &str) -> &str {
    if dtype.is_empty() { "an unknown type" } else { dtype }
}

/// Saves a prompt-cache entry — one-row batch caches ([`LayerCache::Batch`])
/// holding `tokens` — in the session file format (layers of kind `row`),
/// with `origin` (what else made the caches: the adapter) in the metadata.
pub fn save_rows(
    path: &Path,
    fingerprint: &Fingerprint,
    origin: &str,
    tokens: &[u32],
    rows: &[LayerCache],
) -> Result<()> {
    let mut tensors: Vec<(String, Array)> = Vec::new();
    let mut kinds = Vec::with_capacity(rows.len());
    for (i, c) in rows.iter().enumerate() {
        let LayerCache::Batch(b) = c else {
            return Err(Error::invalid("save_prompt_cache", "a prompt-cache entry holds one-row batch caches"));
        };
        let (keys, values, position) = b.row(0)?;
        tensors.push((format!("layers.{i}.keys"), keys));
        tensors.push((format!("layers.{i}.values"), values));
        kinds.push(LayerKind::Row { position, window: b.window() });
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_owned(), FORMAT.to_owned());
    meta.insert("version".to_owned(), VERSION.to_owned());
    meta.insert("model".to_owned(), to_json(fingerprint)?);
    meta.insert("origin".to_owned(), origin.to_owned());
    meta.insert("tokens".to_owned(), to_json(tokens)?);
    meta.insert("layers".to_owned(), to_json(&kinds)?);
    io::save_safetensors(path, tensors.iter().map(|(k, a)| (k.as_str(), a)), &meta)
}

/// Loads a prompt-cache entry saved by [`save_rows`] for the model
/// `fingerprint` names and the same `origin`, checking every layer against
/// `specs` (kind, window, shapes, dtypes) and the positions against the tokens.
pub fn load_rows(
    path: &Path,
    fingerprint: &Fingerprint,
    origin: &str,
    specs: &[LayerSpec],
) -> Result<(Vec<u32>, Vec<LayerCache>)> {
    let bad = |message: String| Error::Format { op: "load_prompt_cache", path: path.to_path_buf(), message };
    let (tokens, kinds, meta) = read_header(path, fingerprint)?;
    let saved = meta.get("origin").map_or("", String::as_str);
    if saved != origin {
        return Err(bad(format!("made with {saved:?}, not {origin:?}")));
    }
    if kinds.len() != specs.len() {
        return Err(bad(format!("{} layers saved, the model has {}", kinds.len(), specs.len())));
    }
    let mut loaded = io::load_safetensors(path)?;
    let mut rows = Vec::with_capacity(kinds.len());
    for (i, (kind, spec)) in kinds.into_iter().zip(specs).enumerate() {
        let k = loaded.tensors.remove(&format!("layers.{i}.keys"));
        let v = loaded.tensors.remove(&format!("layers.{i}.values"));
        let (LayerKind::Row { position, window }, Some(k), Some(v)) = (kind, k, v) else {
            return Err(bad(format!("layer {i}: not a prompt-cache layer with keys and values")));
        };
        for (what, a) in [("keys", &k), ("values", &v)] {
            let s = a.shape();
            let fits = s.len() == 4 && s[0] == 1 && s[1] == spec.heads && s[3] == spec.dim && a.dtype() == spec.dtype;
            if !fits || window != spec.window || s[2] != k.shape()[2] {
                return Err(bad(format!(
                    "layer {i}: {what} {s:?} of {:?} (window {window:?}) do not fit this model's [1, {}, L, {}] of \
                     {:?} (window {:?})",
                    a.dtype(),
                    spec.heads,
                    spec.dim,
                    spec.dtype,
                    spec.window
                )));
            }
        }
        if position as usize != tokens.len() {
            return Err(bad(format!("layer {i} holds {position} positions but {} tokens are recorded", tokens.len())));
        }
        rows.push(LayerCache::Batch(BatchKvCache::from_row(k, v, position, window)?));
    }
    if let Some(extra) = loaded.tensors.keys().next() {
        return Err(bad(format!("unexpected tensor {extra:?}")));
    }
    Ok((tokens, rows))
}

fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::invalid("save_session", e.to_string()))
}
