// SPDX-License-Identifier: EUPL-1.2
//! Qwen 3 (`qwen3`): the Llama decoder with RMS norms on queries and keys
//! (per head, before rope) and no biases.

use serde::Deserialize;

use mlx::Result;

use super::config::{ModelConfig, RopeScaling, Sizes};
use super::layers::{Attention, AttentionSpec, Gate, Mlp, RmsNorm};
use super::llama::{Block, Head, Llama};
use super::rope::Rope;
use super::weights::{Weights, model_err};

/// `config.json` fields of `qwen3` (required ones have no default, as in mlx-lm).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Width, depth, heads, norm epsilon, vocabulary.
    #[serde(flatten)]
    pub sizes: Sizes,
    /// Key/value heads.
    pub num_key_value_heads: i32,
    /// Features per head.
    pub head_dim: i32,
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
pub fn load(config: &ModelConfig, weights: &Weights) -> Result<Llama> {
    let dir = weights.dir();
    let c: Config = config.text_as(dir)?;
    let s = &c.sizes;
    s.check(dir, c.num_key_value_heads, c.head_dim, &[])?;
    let theta = c
        .rope_theta
        .or_else(|| c.rope_parameters.as_ref().and_then(|p| p.rope_theta))
        .ok_or_else(|| model_err(dir, "rope_theta is missing from config.json"))?;
    let scaling = c.rope_scaling.as_ref().or(c.rope_parameters.as_ref());
    let spec = AttentionSpec {
        hidden: s.hidden_size,
        heads: s.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        qkv_bias: false,
        o_bias: false,
    };
    let (hd, eps) = (c.head_dim, s.rms_norm_eps);
    // Nothing is reserved from the config's count: a corrupt count fails at the first missing block.
    let mut layers = Vec::new();
    for i in 0..s.num_hidden_layers {
        let w = weights.root().pp("model.layers").pp(i);
        let a = w.pp("self_attn");
        let rope = Rope::new(hd, theta, false, scaling, dir)?;
        let qk_norm = (RmsNorm::load(&a.pp("q_norm"), hd, eps)?, RmsNorm::load(&a.pp("k_norm"), hd, eps)?);
        let attn = Attention::load(&a, &spec, rope, spec.scale())?.with_qk_norm(qk_norm);
        let mlp = Mlp::load(&w.pp("mlp"), s.hidden_size, s.intermediate_size, false, Gate::Silu)?;
        layers.push(Block::load(&w, attn, mlp, s.hidden_size, eps)?);
    }
    let head =
        Head { tie_word_embeddings: c.tie_word_embeddings, max_position_embeddings: Some(c.max_position_embeddings) };
    Llama::assemble(config, weights, layers, s, head)
}
