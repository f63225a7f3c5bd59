// SPDX-License-Identifier: EUPL-1.2
//! Qwen 3 (`qwen3`): the Llama decoder with RMS norms on queries and keys
//! (per head, before rope) and no biases.

use std::path::Path;

use serde::Deserialize;

use mlx::Result;

use super::config::{ModelConfig, RopeScaling};
use super::llama::{Decoder, DecoderConfig, Variant};
use super::weights::{Weights, model_err};

/// `config.json` fields of `qwen3` (required ones have no default, as in mlx-lm).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Model width.
    pub hidden_size: i32,
    /// Decoder blocks.
    pub num_hidden_layers: i32,
    /// MLP width.
    pub intermediate_size: i32,
    /// Query heads.
    pub num_attention_heads: i32,
    /// Key/value heads.
    pub num_key_value_heads: i32,
    /// Features per head.
    pub head_dim: i32,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: i32,
    /// Trained context length.
    pub max_position_embeddings: i32,
    /// Tied embeddings.
    pub tie_word_embeddings: bool,
    /// Rope base (or inside `rope_parameters` with transformers 5).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rope scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers 5: rope base and scaling together.
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
}

/// Loads a Qwen 3 model.
pub fn load(config: &ModelConfig, weights: &Weights) -> Result<Decoder> {
    let cfg = decoder_config(config, weights.dir())?;
    Decoder::load(config, cfg, weights)
}

fn decoder_config(config: &ModelConfig, dir: &Path) -> Result<DecoderConfig> {
    let c: Config = config.text_as(dir)?;
    let theta = c
        .rope_theta
        .or_else(|| c.rope_parameters.as_ref().and_then(|p| p.rope_theta))
        .ok_or_else(|| model_err(dir, "rope_theta is missing from config.json"))?;
    let scaling = c.rope_scaling.or(c.rope_parameters);
    Ok(DecoderConfig {
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        intermediate_size: c.intermediate_size,
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        eps: c.rms_norm_eps,
        vocab_size: c.vocab_size,
        rope_theta: theta,
        rope_traditional: false,
        rope_scaling: scaling,
        tie_word_embeddings: c.tie_word_embeddings,
        sliding: vec![false; c.num_hidden_layers.max(0) as usize],
        sliding_window: None,
        max_position_embeddings: Some(c.max_position_embeddings),
        variant: Variant { qkv_bias: false, o_bias: false, mlp_bias: false, qk_norm: true },
    })
}
