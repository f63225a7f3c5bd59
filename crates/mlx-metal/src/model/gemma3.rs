// SPDX-License-Identifier: EUPL-1.2
//! Gemma 3 (`gemma3_text`, and the text half of `gemma3`).
//!
//! What sets it apart: embeddings scaled by √hidden (rounded to bfloat16, as
//! the reference does), RMS norms that multiply by `1 + w`, four norms per
//! block (before and after attention, before and after the MLP), q/k norms,
//! a GELU-tanh MLP, attention scaled by `query_pre_attn_scalar^-½`, and
//! sliding-window layers (their own rope base, a rotating cache and a window
//! mask during prefill) between every `sliding_window_pattern`-th global layer.

use std::path::Path;

use half::bf16;
use serde::Deserialize;

use crate::cache::{KvCache, LayerCache, Mask, RotatingKvCache};
use crate::nn::{self, Embedding, FusedLinear, Linear};
use mlx::Result;
use mlx::fast;
use mlx::ops;
use mlx::{Array, Dtype};

use super::config::{ModelConfig, RopeScaling};
use super::rope::Rope;
use super::tp::{self, Heads, Reduce, Vocab};
use super::weights::{WeightPath, Weights, model_err};
use super::{
    AttentionTaps, BlockLinears, Description, LanguageModel, attention, describe, merge_heads, project, split_heads,
};

/// `config.json` fields Gemma 3 reads, with mlx-lm's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
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

impl Default for Config {
    fn default() -> Self {
        Config {
            hidden_size: 1152,
            num_hidden_layers: 26,
            intermediate_size: 6912,
            num_attention_heads: 4,
            num_key_value_heads: 1,
            head_dim: 256,
            rms_norm_eps: 1e-6,
            vocab_size: 262144,
            rope_theta: 1_000_000.0,
            rope_local_base_freq: 10_000.0,
            query_pre_attn_scalar: 256.0,
            sliding_window: 512,
            sliding_window_pattern: 6,
            max_position_embeddings: 32768,
            rope_scaling: None,
        }
    }
}

/// RMS norm with Gemma's `1 + w` weight (precomputed once, in the weight's dtype).
struct Norm {
    weight: Array,
    eps: f32,
}

impl Norm {
    fn load(w: &WeightPath<'_>, dim: i32, eps: f64) -> Result<Norm> {
        let raw = w.tensor("weight", &[dim])?;
        Ok(Norm { weight: ops::add_scalar(&raw, 1.0)?, eps: eps as f32 })
    }

    fn forward(&self, x: &Array) -> Result<Array> {
        fast::rms_norm(x, Some(&self.weight), self.eps)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// q, k and v as one matmul, for decode steps (`nn::FusedLinear`).
    qkv: Option<FusedLinear>,
    q_norm: Norm,
    k_norm: Norm,
    n_heads: i32,
    n_kv_heads: i32,
    scale: f32,
    rope: Rope,
    reduce: Reduce,
}

impl Attention {
    fn forward(
        &self,
        x: &Array,
        mask: &Mask,
        cache: &mut LayerCache,
        mut taps: Option<&mut AttentionTaps>,
    ) -> Result<Array> {
        let (b, l) = (x.dim(0)?, x.dim(1)?);
        let [q, k, v] = project(self.qkv.as_ref(), [&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let q = split_heads(&q, b, l, self.n_heads)?;
        let k = split_heads(&k, b, l, self.n_kv_heads)?;
        let v = split_heads(&v, b, l, self.n_kv_heads)?;
        let q = self.q_norm.forward(&q)?;
        let k = self.k_norm.forward(&k)?;
        let offset = cache.rope_offset()?;
        let q = self.rope.apply(&q, &offset)?;
        let k = self.rope.apply(&k, &offset)?;
        AttentionTaps::record(&mut taps, &q, &k);
        let (k, v) = cache.update_and_fetch(&k, &v)?;
        let out = attention(&q, &k, &v, self.scale, mask)?;
        self.reduce.apply(self.o_proj.forward(&merge_heads(&out, b, l)?)?)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// gate and up as one matmul, for decode steps.
    gate_up: Option<FusedLinear>,
    reduce: Reduce,
}

impl Mlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        let [gate, up] = project(self.gate_up.as_ref(), [&self.gate_proj, &self.up_proj], x)?;
        let h = nn::geglu_approx(&gate, &up)?;
        self.reduce.apply(self.down_proj.forward(&h)?)
    }
}

struct Block {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    pre_feedforward_layernorm: Norm,
    post_feedforward_layernorm: Norm,
    is_sliding: bool,
}

impl Block {
    /// The block's linear layers, lent to LoRA and to fusing.
    fn linears(&mut self) -> BlockLinears<'_> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        BlockLinears {
            attn: [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj],
            mlp: [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj],
            qkv: &mut a.qkv,
            gate_up: &mut m.gate_up,
        }
    }

    fn forward(
        &self,
        x: &Array,
        mask: &Mask,
        cache: &mut LayerCache,
        taps: Option<&mut AttentionTaps>,
    ) -> Result<Array> {
        let r = self.self_attn.forward(&self.input_layernorm.forward(x)?, mask, cache, taps)?;
        let h = clip_residual(x, &self.post_attention_layernorm.forward(&r)?)?;
        let r = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&h)?)?;
        clip_residual(&h, &self.post_feedforward_layernorm.forward(&r)?)
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
pub struct Gemma3 {
    cfg: Config,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: Norm,
    lm_head: Option<Linear>,
    /// Which vocabulary rows this rank's embedding and head hold.
    vocab: Vocab,
    desc: Description,
}

impl Gemma3 {
    /// Builds the model from a config and weights.
    pub fn load(config: &ModelConfig, weights: &Weights) -> Result<Gemma3> {
        let dir = weights.dir();
        let cfg: Config = config.text_as(dir)?;
        check(&cfg, dir)?;
        let root = weights.root();
        let m = root.pp("model");
        let (hidden, heads, kv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps;
        // Tensor parallelism (see `tp`): this rank's heads and MLP slice.
        let tpar = weights.tensor_parallel();
        let shard = tpar.map(|t| t.shard());
        let part = Heads::of(heads, kv, shard).map_err(|e| model_err(dir, e.to_string()))?;
        let (mlp_in, mlp_out) = tp::mlp(cfg.intermediate_size, shard).map_err(|e| model_err(dir, e.to_string()))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers as usize);
        for i in 0..cfg.num_hidden_layers {
            let lw = m.pp("layers").pp(i);
            let a = lw.pp("self_attn");
            let is_sliding = (i + 1) % cfg.sliding_window_pattern != 0;
            let rope = if is_sliding {
                Rope::new(hd, cfg.rope_local_base_freq, false, None, dir)?
            } else {
                Rope::new(hd, cfg.rope_theta, false, cfg.rope_scaling.as_ref(), dir)?
            };
            layers.push(Block {
                self_attn: Attention {
                    q_proj: a.pp("q_proj").linear_split(heads * hd, hidden, false, part.q(hd))?,
                    k_proj: a.pp("k_proj").linear_split(kv * hd, hidden, false, part.kv(hd))?,
                    v_proj: a.pp("v_proj").linear_split(kv * hd, hidden, false, part.kv(hd))?,
                    o_proj: a.pp("o_proj").linear_split(hidden, heads * hd, false, part.o(hd, shard))?,
                    q_norm: Norm::load(&a.pp("q_norm"), hd, eps)?,
                    k_norm: Norm::load(&a.pp("k_norm"), hd, eps)?,
                    n_heads: part.q_len,
                    n_kv_heads: part.kv_len,
                    scale: cfg.query_pre_attn_scalar.powf(-0.5) as f32,
                    rope,
                    qkv: None,
                    reduce: Reduce::new(tpar),
                },
                mlp: Mlp {
                    gate_proj: lw.pp("mlp").pp("gate_proj").linear_split(
                        cfg.intermediate_size,
                        hidden,
                        false,
                        mlp_in,
                    )?,
                    up_proj: lw.pp("mlp").pp("up_proj").linear_split(cfg.intermediate_size, hidden, false, mlp_in)?,
                    down_proj: lw.pp("mlp").pp("down_proj").linear_split(
                        hidden,
                        cfg.intermediate_size,
                        false,
                        mlp_out,
                    )?,
                    gate_up: None,
                    reduce: Reduce::new(tpar),
                },
                input_layernorm: Norm::load(&lw.pp("input_layernorm"), hidden, eps)?,
                post_attention_layernorm: Norm::load(&lw.pp("post_attention_layernorm"), hidden, eps)?,
                pre_feedforward_layernorm: Norm::load(&lw.pp("pre_feedforward_layernorm"), hidden, eps)?,
                post_feedforward_layernorm: Norm::load(&lw.pp("post_feedforward_layernorm"), hidden, eps)?,
                is_sliding,
            });
        }
        // The embedding and head: this rank's vocabulary rows (see `tp::Vocab`).
        let vocab = Vocab::new(cfg.vocab_size, tpar).map_err(|e| model_err(dir, e.to_string()))?;
        let (v_start, v_len) = vocab.rows();
        let embed_tokens = m.pp("embed_tokens").embedding_rows(cfg.vocab_size, hidden, v_start, v_len)?;
        let lm_head = if root.pp("lm_head").contains("weight") {
            Some(root.pp("lm_head").linear_split(cfg.vocab_size, hidden, false, vocab.split())?)
        } else {
            None
        };
        let norm = Norm::load(&m.pp("norm"), hidden, eps)?;
        weights.ignore(|k| {
            k.contains("rotary_emb.inv_freq") || k.starts_with("vision_tower") || k.starts_with("multi_modal_projector")
        });
        let desc = describe(config, &cfg_desc(&cfg), embed_tokens.quantisation());
        Ok(Gemma3 { cfg, embed_tokens, layers, norm, lm_head, vocab, desc })
    }
}

fn cfg_desc(cfg: &Config) -> (i32, i32, i32, Option<i32>) {
    (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size, Some(cfg.max_position_embeddings))
}

fn check(cfg: &Config, dir: &Path) -> Result<()> {
    let positive = [
        ("hidden_size", cfg.hidden_size),
        ("num_hidden_layers", cfg.num_hidden_layers),
        ("intermediate_size", cfg.intermediate_size),
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("head_dim", cfg.head_dim),
        ("vocab_size", cfg.vocab_size),
        ("sliding_window", cfg.sliding_window),
        ("sliding_window_pattern", cfg.sliding_window_pattern),
    ];
    for (name, v) in positive {
        if v <= 0 {
            return Err(model_err(dir, format!("{name} = {v} must be positive")));
        }
    }
    if cfg.num_attention_heads % cfg.num_key_value_heads != 0 {
        return Err(model_err(dir, "num_attention_heads must be a multiple of num_key_value_heads"));
    }
    if cfg.query_pre_attn_scalar <= 0.0 {
        return Err(model_err(dir, "query_pre_attn_scalar must be positive"));
    }
    Ok(())
}

impl LanguageModel for Gemma3 {
    fn forward_tapped(
        &self,
        inputs: &Array,
        caches: &mut [LayerCache],
        mut taps: Option<&mut AttentionTaps>,
    ) -> Result<Array> {
        super::check_caches(caches, self.layers.len())?;
        let mut h = self.vocab.embed(&self.embed_tokens, inputs)?;
        // The reference rounds √hidden to bfloat16 before scaling.
        let scale = bf16::from_f32((f64::from(self.cfg.hidden_size).sqrt()) as f32).to_f64();
        h = ops::multiply(&h, &Array::scalar_as(scale, h.dtype())?)?;
        let n = h.dim(1)?;
        let pattern = self.cfg.sliding_window_pattern as usize;
        let global_mask = caches[(pattern - 1).min(caches.len() - 1)].make_mask(n, None)?;
        let sliding_mask =
            if pattern > 1 { caches[0].make_mask(n, Some(self.cfg.sliding_window))? } else { Mask::None };
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            let mask = if layer.is_sliding { &sliding_mask } else { &global_mask };
            h = layer.forward(&h, mask, cache, taps.as_deref_mut())?;
        }
        self.head(&h)
    }

    fn make_cache(&self) -> Result<Vec<LayerCache>> {
        self.layers
            .iter()
            .map(|l| {
                Ok(if l.is_sliding {
                    LayerCache::Rotating(RotatingKvCache::new(self.cfg.sliding_window)?)
                } else {
                    LayerCache::Standard(KvCache::new())
                })
            })
            .collect()
    }

    fn description(&self) -> &Description {
        &self.desc
    }

    fn fuse_projections(&mut self) -> Result<()> {
        super::fuse_blocks(self.layers.iter_mut().map(Block::linears))
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        super::block_linears(self.layers.iter_mut().map(Block::linears))
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn embed(&self, inputs: &Array) -> Result<Array> {
        let h = self.vocab.embed(&self.embed_tokens, inputs)?;
        let scale = bf16::from_f32((f64::from(self.cfg.hidden_size).sqrt()) as f32).to_f64();
        ops::multiply(&h, &Array::scalar_as(scale, h.dtype())?)
    }

    fn runs_block_by_block(&self) -> bool {
        true
    }

    fn forward_layer(&self, layer: usize, h: &Array, cache: &mut LayerCache) -> Result<Array> {
        super::layer_index("forward_layer", layer, self.layers.len())?;
        let block = &self.layers[layer];
        let window = if block.is_sliding { Some(self.cfg.sliding_window) } else { None };
        let mask = cache.make_mask(h.dim(1)?, window)?;
        block.forward(h, &mask, cache, None)
    }

    fn head(&self, h: &Array) -> Result<Array> {
        let h = self.norm.forward(h)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        self.vocab.gather(&logits)
    }
}
