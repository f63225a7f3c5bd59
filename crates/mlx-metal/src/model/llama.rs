// SPDX-License-Identifier: EUPL-1.2
//! Llama 3 (`llama`, `mistral`), and the pre-norm decoder that Qwen 2 and
//! Qwen 3 build from their own configs.
//!
//! The block reads like the paper: `h = x + attn(norm(x)); out = h + mlp(norm(h))`,
//! with a SwiGLU MLP and grouped-query attention. Llama 3 adds its rope
//! scaling (`rope_scaling.rope_type = "llama3"`); layers named
//! `sliding_attention` in `layer_types` attend over a window.

use serde::Deserialize;

use mlx::Result;

use super::config::{ModelConfig, RopeScaling, Sizes};
use super::describe;
use super::layers::{Attention, AttentionSpec, Gate, Hidden, Mlp, RmsNorm};
use super::rope::Rope;
use super::transformer::{DecoderBlock, Transformer};
use super::weights::{WeightPath, Weights, model_err};
use crate::cache::{LayerCache, Mask};

/// `config.json` fields of `llama`, with mlx-lm's defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Width, depth, heads, norm epsilon, vocabulary.
    #[serde(flatten)]
    pub sizes: Sizes,
    /// Features per head (default hidden / heads).
    #[serde(default)]
    pub head_dim: Option<i32>,
    /// Trained context length.
    #[serde(default)]
    pub max_position_embeddings: Option<i32>,
    /// Key/value heads (default: as many as query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<i32>,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Rope base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Rotate adjacent pairs.
    #[serde(default)]
    pub rope_traditional: bool,
    /// Rope scaling (Llama 3).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Share the embedding table with the output head.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Per-layer "full_attention" / "sliding_attention".
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Window of sliding layers.
    #[serde(default)]
    pub sliding_window: Option<i32>,
}

fn default_theta() -> f64 {
    10_000.0
}

fn default_true() -> bool {
    true
}

/// A pre-norm decoder block.
pub struct Block {
    /// Attention.
    pub self_attn: Attention,
    /// The MLP.
    pub mlp: Mlp,
    /// The norm before attention.
    pub input_layernorm: RmsNorm,
    /// The norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// The window of a sliding block.
    pub window: Option<i32>,
}

impl Block {
    /// The block at `w` around its attention and MLP (reads the two norms).
    pub fn load(w: &WeightPath<'_>, self_attn: Attention, mlp: Mlp, hidden: i32, eps: f64) -> Result<Block> {
        Ok(Block {
            self_attn,
            mlp,
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), hidden, eps)?,
            post_attention_layernorm: RmsNorm::load(&w.pp("post_attention_layernorm"), hidden, eps)?,
            window: None,
        })
    }
}

impl DecoderBlock for Block {
    fn forward_chained<'a>(&'a self, x: Hidden<'a>, mask: &Mask, cache: &mut LayerCache) -> Result<Hidden<'a>> {
        let (x, r) = self.self_attn.forward_after(x, &self.input_layernorm, mask, cache)?;
        let (h, r) = self.mlp.forward_after(Hidden::Pending { x, r, r_norm: None }, &self.post_attention_layernorm)?;
        Ok(Hidden::Pending { x: h, r, r_norm: None })
    }

    fn input_norm(&self) -> &RmsNorm {
        &self.input_layernorm
    }

    fn window(&self) -> Option<i32> {
        self.window
    }

    fn attention_and_mlp(&mut self) -> (&mut Attention, &mut Mlp) {
        (&mut self.self_attn, &mut self.mlp)
    }
}

/// The pre-norm decoder of Llama 3, Qwen 2 and Qwen 3.
pub type Llama = Transformer<Block>;

/// The tied or untied head, and the trained context, read from an
/// architecture's config.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    /// The head is the embedding table.
    pub tie_word_embeddings: bool,
    /// Trained context length.
    pub max_position_embeddings: Option<i32>,
}

impl Llama {
    /// Builds a Llama model from its config and weights.
    pub fn load(config: &ModelConfig, weights: &Weights) -> Result<Llama> {
        let dir = weights.dir();
        let c: Config = config.text_as(dir)?;
        let s = &c.sizes;
        let heads = s.num_attention_heads;
        let spec = AttentionSpec {
            hidden: s.hidden_size,
            heads,
            kv_heads: c.num_key_value_heads.unwrap_or(heads),
            head_dim: c.head_dim.unwrap_or(s.even_head_dim()),
            qkv_bias: c.attention_bias,
            o_bias: c.attention_bias,
        };
        s.check(dir, spec.kv_heads, spec.head_dim, &[])?;
        // Nothing is reserved from the config's count: a corrupt count fails at the first missing block.
        let n = s.num_hidden_layers as usize;
        let types = c.layer_types.as_deref().unwrap_or_default();
        if c.layer_types.is_some() && types.len() != n {
            let (listed, layers) = (types.len(), s.num_hidden_layers);
            return Err(model_err(dir, format!("layer_types lists {listed} layers but num_hidden_layers is {layers}")));
        }
        let is_sliding = |i: usize| types.get(i).is_some_and(|x| x == "sliding_attention");
        if (0..types.len()).any(is_sliding) && c.sliding_window.is_none_or(|w| w <= 0) {
            return Err(model_err(dir, "sliding layers need a positive sliding_window"));
        }
        let theta = c.rope_scaling.as_ref().and_then(|s| s.rope_theta).unwrap_or(c.rope_theta);
        let mut layers = Vec::new();
        for i in 0..n {
            let w = weights.root().pp("model.layers").pp(i);
            let rope = Rope::new(spec.head_dim, theta, c.rope_traditional, c.rope_scaling.as_ref(), dir)?;
            let attn = Attention::load(&w.pp("self_attn"), &spec, rope, spec.scale())?;
            let mlp = Mlp::load(&w.pp("mlp"), s.hidden_size, s.intermediate_size, c.mlp_bias, Gate::Silu)?;
            let window = if is_sliding(i) { c.sliding_window } else { None };
            layers.push(Block { window, ..Block::load(&w, attn, mlp, s.hidden_size, s.rms_norm_eps)? });
        }
        let head =
            Head { tie_word_embeddings: c.tie_word_embeddings, max_position_embeddings: c.max_position_embeddings };
        Llama::assemble(config, weights, layers, s, head)
    }

    /// The model around `layers`: the embedding, the final norm and the head
    /// (Qwen 2 and Qwen 3 build their blocks and come here too).
    pub fn assemble(
        config: &ModelConfig,
        weights: &Weights,
        layers: Vec<Block>,
        s: &Sizes,
        head: Head,
    ) -> Result<Llama> {
        let root = weights.root();
        let embed_tokens = root.pp("model.embed_tokens").embedding(s.vocab_size, s.hidden_size)?;
        let lm_head = if head.tie_word_embeddings {
            weights.ignore(|k| k == "lm_head.weight" || k.starts_with("lm_head."));
            None
        } else {
            Some(root.pp("lm_head").head(s.vocab_size, s.hidden_size)?)
        };
        let norm = RmsNorm::load(&root.pp("model.norm"), s.hidden_size, s.rms_norm_eps)?;
        weights.ignore(|k| k.contains("rotary_emb.inv_freq"));
        let dims = (s.vocab_size, layers.len() as i32, s.hidden_size, head.max_position_embeddings);
        let desc = describe(config, &dims, embed_tokens.quantisation());
        Ok(Transformer { embed_tokens, embed_scale: None, layers, norm, lm_head, desc })
    }
}
