// SPDX-License-Identifier: EUPL-1.2
//! Gemma 3 (`gemma3_text`, and the text half of `gemma3`).
//!
//! What sets it apart: embeddings scaled by √hidden (rounded to bfloat16, as
//! the reference does), RMS norms that multiply by `1 + w`, four norms per
//! block (before and after attention, before and after the MLP), q/k norms,
//! a GELU-tanh MLP, attention scaled by `query_pre_attn_scalar^-½`, and
//! sliding-window layers (their own rope base, a rotating cache and a window
//! mask during prefill) between every `sliding_window_pattern`-th global layer.

use half::bf16;
use serde::Deserialize;

use mlx::{Array, Dtype, Result, ops};

use super::config::{ModelConfig, RopeScaling, Sizes};
use super::describe;
use super::layers::{Attention, AttentionSpec, Gate, Hidden, Mlp, RmsNorm};
use super::rope::Rope;
use super::transformer::{DecoderBlock, Transformer};
use super::weights::{WeightPath, Weights, model_err};
use crate::cache::{LayerCache, Mask};

/// `config.json` fields Gemma 3 reads; mlx-lm's defaults are [`defaults`].
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Width, depth, heads, norm epsilon, vocabulary.
    #[serde(flatten)]
    pub sizes: Sizes,
    /// Key/value heads.
    pub num_key_value_heads: i32,
    /// Features per head.
    pub head_dim: i32,
    /// Rope base of global layers.
    pub rope_theta: f64,
    /// Rope base of sliding layers.
    pub rope_local_base_freq: f64,
    /// Attention is scaled by `query_pre_attn_scalar^-½`.
    pub query_pre_attn_scalar: f64,
    /// Keys a sliding layer sees.
    pub sliding_window: i32,
    /// Every n-th layer is global.
    pub sliding_window_pattern: i32,
    /// Trained context length.
    pub max_position_embeddings: i32,
    /// Rope scaling of global layers.
    pub rope_scaling: Option<RopeScaling>,
}

/// mlx-lm's defaults for the fields config.json leaves out (Gemma 3 1B's shape).
pub fn defaults() -> serde_json::Value {
    serde_json::json!({
        "hidden_size": 1152,
        "num_hidden_layers": 26,
        "intermediate_size": 6912,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "rms_norm_eps": 1e-6,
        "vocab_size": 262144,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": 256.0,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 32768,
    })
}

impl Config {
    fn check(&self, dir: &std::path::Path) -> Result<()> {
        let more = [("sliding_window", self.sliding_window), ("sliding_window_pattern", self.sliding_window_pattern)];
        self.sizes.check(dir, self.num_key_value_heads, self.head_dim, &more)?;
        if self.query_pre_attn_scalar <= 0.0 {
            return Err(model_err(dir, "query_pre_attn_scalar must be positive"));
        }
        Ok(())
    }
}

/// A Gemma 3 block: four norms (before and after attention, before and after
/// the MLP).
pub struct Block {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    window: Option<i32>,
}

impl Block {
    fn load(w: &WeightPath<'_>, c: &Config, is_sliding: bool) -> Result<Block> {
        let (hidden, hd, eps) = (c.sizes.hidden_size, c.head_dim, c.sizes.rms_norm_eps);
        let dir = w.dir();
        let rope = if is_sliding {
            Rope::new(hd, c.rope_local_base_freq, false, None, dir)?
        } else {
            Rope::new(hd, c.rope_theta, false, c.rope_scaling.as_ref(), dir)?
        };
        let spec = AttentionSpec {
            hidden,
            heads: c.sizes.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: hd,
            qkv_bias: false,
            o_bias: false,
        };
        let a = w.pp("self_attn");
        let qk_norm =
            (RmsNorm::load_plus_one(&a.pp("q_norm"), hd, eps)?, RmsNorm::load_plus_one(&a.pp("k_norm"), hd, eps)?);
        let scale = c.query_pre_attn_scalar.powf(-0.5) as f32;
        let norm = |name: &str| RmsNorm::load_plus_one(&w.pp(name), hidden, eps);
        Ok(Block {
            self_attn: Attention::load(&a, &spec, rope, scale)?.with_qk_norm(qk_norm),
            mlp: Mlp::load(&w.pp("mlp"), hidden, c.sizes.intermediate_size, false, Gate::GeluApprox)?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            window: if is_sliding { Some(c.sliding_window) } else { None },
        })
    }
}

impl DecoderBlock for Block {
    fn forward_chained<'a>(&'a self, x: Hidden<'a>, mask: &Mask, cache: &mut LayerCache) -> Result<Hidden<'a>> {
        let (x, r) = self.self_attn.forward_after(x, &self.input_layernorm, mask, cache)?;
        if x.dtype() == Dtype::Float16 {
            let h = clip_residual(&x, &self.post_attention_layernorm.forward(&r)?)?;
            let r = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&h)?)?;
            return Ok(Hidden::Ready(clip_residual(&h, &self.post_feedforward_layernorm.forward(&r)?)?));
        }
        // Each sublayer's output normed, added to the residual and normed again for what comes
        // next (the MLP; the next block or the head): one kernel each on CUDA, with the
        // projection after it for a decode step of one sequence.
        let pending = Hidden::Pending { x, r, r_norm: Some(&self.post_attention_layernorm) };
        let (h, r) = self.mlp.forward_after(pending, &self.pre_feedforward_layernorm)?;
        Ok(Hidden::Pending { x: h, r, r_norm: Some(&self.post_feedforward_layernorm) })
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

/// `x + y`, computed in float32 and clipped to the float16 range when the
/// model runs in float16 (as the reference does, to avoid overflow).
fn clip_residual(x: &Array, y: &Array) -> Result<Array> {
    if x.dtype() != Dtype::Float16 {
        return ops::add(x, y);
    }
    let bound = f64::from(half::f16::MAX);
    let sum = ops::add(&ops::astype(x, Dtype::Float32)?, &ops::astype(y, Dtype::Float32)?)?;
    let lo = Array::scalar_as(-bound, Dtype::Float32)?;
    let hi = Array::scalar_as(bound, Dtype::Float32)?;
    ops::astype(&ops::clip(&sum, Some(&lo), Some(&hi))?, Dtype::Float16)
}

/// A Gemma 3 language model.
pub type Gemma3 = Transformer<Block>;

impl Gemma3 {
    /// Builds the model from a config and weights.
    pub fn load(config: &ModelConfig, weights: &Weights) -> Result<Gemma3> {
        let dir = weights.dir();
        let c: Config = config.text_with_defaults(dir, defaults())?;
        c.check(dir)?;
        let (s, root) = (&c.sizes, weights.root());
        let layers = (0..s.num_hidden_layers)
            .map(|i| Block::load(&root.pp("model.layers").pp(i), &c, (i + 1) % c.sliding_window_pattern != 0))
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = root.pp("model.embed_tokens").embedding(s.vocab_size, s.hidden_size)?;
        let lm_head = if root.pp("lm_head").contains("weight") {
            Some(root.pp("lm_head").head(s.vocab_size, s.hidden_size)?)
        } else {
            None
        };
        let norm = RmsNorm::load_plus_one(&root.pp("model.norm"), s.hidden_size, s.rms_norm_eps)?;
        weights.ignore(|k| {
            k.contains("rotary_emb.inv_freq") || k.starts_with("vision_tower") || k.starts_with("multi_modal_projector")
        });
        let dims = (s.vocab_size, s.num_hidden_layers, s.hidden_size, Some(c.max_position_embeddings));
        let desc = describe(config, &dims, embed_tokens.quantisation());
        // The reference rounds √hidden to bfloat16 before scaling the embeddings.
        let embed_scale = Some(bf16::from_f32((f64::from(s.hidden_size).sqrt()) as f32).to_f64());
        Ok(Transformer { embed_tokens, embed_scale, layers, norm, lm_head, desc })
    }
}
