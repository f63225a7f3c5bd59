// SPDX-License-Identifier: EUPL-1.2
//! Qwen 2 (`qwen2`): the Llama decoder with biases on the q, k and v
//! projections; head size is always `hidden_size / num_attention_heads`.

use serde::Deserialize;

use mlx::Result;

use super::config::{ModelConfig, RopeScaling};
use super::llama::{Decoder, DecoderConfig, Variant};
use super::weights::Weights;

/// `config.json` fields of `qwen2`, with mlx-lm's defaults.
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
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: i32,
    /// Key/value heads.
    pub num_key_value_heads: i32,
    /// Trained context length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i32,
    /// Rope base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Rotate adjacent pairs.
    #[serde(default)]
    pub rope_traditional: bool,
    /// Rope scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Tied embeddings.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

fn default_max_pos() -> i32 {
    32768
}

fn default_theta() -> f64 {
    1_000_000.0
}

fn default_true() -> bool {
    true
}

/// Loads a Qwen 2 model.
pub fn load(config: &ModelConfig, weights: &Weights) -> Result<Decoder> {
    let c: Config = config.text_as(weights.dir())?;
    let head_dim = if c.num_attention_heads > 0 { c.hidden_size / c.num_attention_heads } else { 0 };
    let cfg = DecoderConfig {
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        intermediate_size: c.intermediate_size,
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_key_value_heads,
        head_dim,
        eps: c.rms_norm_eps,
        vocab_size: c.vocab_size,
        rope_theta: c.rope_theta,
        rope_traditional: c.rope_traditional,
        rope_scaling: c.rope_scaling,
        tie_word_embeddings: c.tie_word_embeddings,
        sliding: vec![false; c.num_hidden_layers.max(0) as usize],
        sliding_window: None,
        max_position_embeddings: Some(c.max_position_embeddings),
        variant: Variant { qkv_bias: true, o_bias: false, mlp_bias: false, qk_norm: false },
    };
    Decoder::load(config, cfg, weights)
}
