// SPDX-License-Identifier: EUPL-1.2
//! Qwen 2 (`qwen2`): the Llama decoder with biases on the q, k and v
//! projections; head size is always `hidden_size / num_attention_heads`.

use serde::Deserialize;

use mlx::Result;

use super::config::{ModelConfig, RopeScaling, Sizes};
use super::layers::{Attention, AttentionSpec, Gate, Mlp};
use super::llama::{Block, Head, Llama};
use super::rope::Rope;
use super::weights::Weights;

/// `config.json` fields of `qwen2`, with mlx-lm's defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Width, depth, heads, norm epsilon, vocabulary.
    #[serde(flatten)]
    pub sizes: Sizes,
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
pub fn load(config: &ModelConfig, weights: &Weights) -> Result<Llama> {
    let dir = weights.dir();
    let c: Config = config.text_as(dir)?;
    let s = &c.sizes;
    let spec = AttentionSpec {
        hidden: s.hidden_size,
        heads: s.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: s.even_head_dim(),
        qkv_bias: true,
        o_bias: false,
    };
    s.check(dir, spec.kv_heads, spec.head_dim, &[])?;
    // Nothing is reserved from the config's count: a corrupt count fails at the first missing block.
    let mut layers = Vec::new();
    for i in 0..s.num_hidden_layers {
        let w = weights.root().pp("model.layers").pp(i);
        let rope = Rope::new(spec.head_dim, c.rope_theta, c.rope_traditional, c.rope_scaling.as_ref(), dir)?;
        let attn = Attention::load(&w.pp("self_attn"), &spec, rope, spec.scale())?;
        let mlp = Mlp::load(&w.pp("mlp"), s.hidden_size, s.intermediate_size, false, Gate::Silu)?;
        layers.push(Block::load(&w, attn, mlp, s.hidden_size, s.rms_norm_eps)?);
    }
    let head =
        Head { tie_word_embeddings: c.tie_word_embeddings, max_position_embeddings: Some(c.max_position_embeddings) };
    Llama::assemble(config, weights, layers, s, head)
}
