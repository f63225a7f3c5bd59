// SPDX-License-Identifier: EUPL-1.2
//! Reading `config.json`: the architecture, the text config (flat or nested
//! under `text_config`), quantisation and rope scaling.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use mlx::{Error, Result};

use super::weights::model_err;

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The whole file.
    pub raw: Value,
    /// The language model's settings: `text_config` merged over the top level.
    pub text: Map<String, Value>,
    /// `model_type` (of the text model when nested).
    pub model_type: String,
    /// Quantisation, when the checkpoint is quantised.
    pub quant: Option<QuantConfig>,
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            op: "load_config",
            path: path.clone(),
            source,
        })?;
        Self::parse(&path, &text)
    }

    /// Parses the text of a `config.json` (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<ModelConfig> {
        let raw: Value = serde_json::from_str(text).map_err(|e| model_err(path, format!("not valid JSON: {e}")))?;
        let top = raw.as_object().ok_or_else(|| model_err(path, "config.json is not a JSON object"))?;
        let mut merged = top.clone();
        let nested = top.get("text_config").and_then(Value::as_object);
        if let Some(tc) = nested {
            merged.remove("text_config");
            for (k, v) in tc {
                merged.insert(k.clone(), v.clone());
            }
        }
        let model_type = nested
            .and_then(|tc| tc.get("model_type"))
            .or_else(|| top.get("model_type"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| architecture_model_type(top))
            .ok_or_else(|| model_err(path, "config.json has no model_type"))?;
        let quant = ["quantization", "quantization_config"]
            .iter()
            .find_map(|k| top.get(*k).or_else(|| nested.and_then(|tc| tc.get(*k))))
            .map(|q| QuantConfig::parse(path, q))
            .transpose()?
            .flatten();
        Ok(ModelConfig { raw, text: merged, model_type, quant })
    }

    /// The text settings as a typed config (unknown keys ignored, defaults for
    /// missing ones).
    pub fn text_as<T: DeserializeOwned>(&self, path: &Path) -> Result<T> {
        self.text_with_defaults(path, Value::Null)
    }

    /// [`ModelConfig::text_as`], with the keys of `defaults` (a JSON object)
    /// standing in for those config.json does not set.
    pub fn text_with_defaults<T: DeserializeOwned>(&self, path: &Path, defaults: Value) -> Result<T> {
        let mut text = match defaults {
            Value::Object(d) => d,
            _ => Map::new(),
        };
        text.extend(self.text.iter().map(|(k, v)| (k.clone(), v.clone())));
        serde_json::from_value(Value::Object(text))
            .map_err(|e| model_err(path, format!("config.json does not fit {}: {e}", self.model_type)))
    }
}

fn architecture_model_type(top: &Map<String, Value>) -> Option<String> {
    let arch = top.get("architectures")?.as_array()?.first()?.as_str()?;
    let t = match arch {
        a if a.starts_with("Gemma3ForConditional") => "gemma3",
        a if a.starts_with("Gemma3") => "gemma3_text",
        a if a.starts_with("Qwen3") => "qwen3",
        a if a.starts_with("Qwen2") => "qwen2",
        a if a.starts_with("Llama") || a.starts_with("Mistral") => "llama",
        _ => return None,
    };
    Some(t.to_string())
}

/// Affine quantisation settings from `quantization` / `quantization_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    /// Default group size.
    pub group_size: i32,
    /// Default bits.
    pub bits: i32,
    /// Per-layer entries (`"model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8}`).
    pub layers: BTreeMap<String, (i32, i32)>,
}

impl QuantConfig {
    fn parse(path: &Path, v: &Value) -> Result<Option<QuantConfig>> {
        let Some(o) = v.as_object() else {
            return Ok(None);
        };
        if let Some(method) = o.get("quant_method").and_then(Value::as_str)
            && method != "mlx"
        {
            return Err(model_err(path, format!("quantisation method {method:?} is not supported (MLX affine only)")));
        }
        // An integer out of `i32`'s range is an error, not a value cut to fit.
        let int = |o: &Map<String, Value>, k: &str| -> Result<Option<i32>> {
            let Some(v) = o.get(k).filter(|v| v.is_i64() || v.is_u64()) else { return Ok(None) };
            let x = v.as_i64().and_then(|x| i32::try_from(x).ok());
            x.map(Some).ok_or_else(|| model_err(path, format!("quantization {k} = {v} is out of range")))
        };
        let (Some(group_size), Some(bits)) = (int(o, "group_size")?, int(o, "bits")?) else {
            return Err(model_err(path, "quantization needs group_size and bits"));
        };
        if let Some(mode) = o.get("mode").and_then(Value::as_str)
            && mode != "affine"
        {
            return Err(model_err(path, format!("quantisation mode {mode:?} is not supported (affine only)")));
        }
        let mut layers = BTreeMap::new();
        for (k, v) in o {
            if let Some(lo) = v.as_object() {
                let g = int(lo, "group_size")?.unwrap_or(group_size);
                let b = int(lo, "bits")?.unwrap_or(bits);
                layers.insert(k.clone(), (g, b));
            }
        }
        Ok(Some(QuantConfig { group_size, bits, layers }))
    }

    /// The explicit per-layer setting for `prefix`, if any.
    pub fn layer_override(&self, prefix: &str) -> Option<(i32, i32)> {
        self.layers.get(prefix).copied()
    }
}

/// `rope_scaling` (or transformers 5's `rope_parameters`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Default)]
pub struct RopeScaling {
    /// "default", "linear", "llama3" (others are rejected).
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    /// The scaling factor.
    pub factor: Option<f64>,
    /// Llama 3: low-frequency factor (default 1).
    pub low_freq_factor: Option<f64>,
    /// Llama 3: high-frequency factor (default 4).
    pub high_freq_factor: Option<f64>,
    /// Llama 3: the context length the model was trained with (default 8192).
    pub original_max_position_embeddings: Option<f64>,
    /// transformers 5 nests the base here.
    pub rope_theta: Option<f64>,
}

/// The sizes every decoder's config.json names alike (the `ModelArgs` fields
/// of the same names in each of mlx-lm's model files); each architecture's
/// `Config` flattens it in.
#[derive(Debug, Clone, Deserialize)]
pub struct Sizes {
    /// Model width.
    pub hidden_size: i32,
    /// Decoder blocks.
    pub num_hidden_layers: i32,
    /// MLP width.
    pub intermediate_size: i32,
    /// Query heads.
    pub num_attention_heads: i32,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: i32,
}

impl Sizes {
    /// `hidden_size / num_attention_heads`, the head size of architectures
    /// that do not name one (0 when there are no heads, which [`Sizes::check`]
    /// reports).
    pub fn even_head_dim(&self) -> i32 {
        if self.num_attention_heads > 0 { self.hidden_size / self.num_attention_heads } else { 0 }
    }

    /// Checks that every size is positive (`kv_heads` and `head_dim` as the
    /// architecture reads them, then `more`), naming the first that is not,
    /// and that the query heads group over the key/value heads.
    pub fn check(&self, dir: &Path, kv_heads: i32, head_dim: i32, more: &[(&str, i32)]) -> Result<()> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", kv_heads),
            ("head_dim", head_dim),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, v)) = sizes.iter().chain(more).find(|(_, v)| *v <= 0) {
            return Err(model_err(dir, format!("{name} = {v} must be positive")));
        }
        if self.num_attention_heads % kv_heads != 0 {
            return Err(model_err(dir, "num_attention_heads must be a multiple of num_key_value_heads"));
        }
        Ok(())
    }
}
