// SPDX-License-Identifier: EUPL-1.2
//! Llama 3 (`llama`), and the pre-norm decoder that Qwen 2 and Qwen 3 share
//! with it.
//!
//! The block reads like the paper: `h = x + attn(norm(x)); out = h + mlp(norm(h))`,
//! with a SwiGLU MLP and grouped-query attention. Llama 3 adds its rope
//! scaling (`rope_scaling.rope_type = "llama3"`); [`Variant`] switches on the
//! Qwen differences: q/k/v biases (Qwen 2) and q/k RMS norms (Qwen 3).

use std::path::Path;

use serde::Deserialize;

use crate::cache::{KvCache, LayerCache, Mask, RotatingKvCache};
use crate::nn::{self, Embedding, FusedLinear, Linear};
use mlx::Array;
use mlx::Result;
use mlx::fast;
use mlx::ops;

use super::config::{ModelConfig, RopeScaling};
use super::rope::Rope;
use super::tp::{self, Heads, Reduce, Vocab};
use super::weights::{WeightPath, Weights, model_err};
use super::{
    AttentionTaps, BlockLinears, Description, LanguageModel, attention, describe, merge_heads, project, split_heads,
};

/// `config.json` fields of `llama`, with mlx-lm's defaults.
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

/// The decoder's architectural switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// Biases on q, k and v (Qwen 2), or on all four projections (`attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// RMS norms on queries and keys per head (Qwen 3).
    pub qk_norm: bool,
}

/// Everything the shared decoder needs, whichever config it came from.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Model width.
    pub hidden_size: i32,
    /// Decoder blocks.
    pub num_layers: i32,
    /// MLP width.
    pub intermediate_size: i32,
    /// Query heads.
    pub num_heads: i32,
    /// Key/value heads.
    pub num_kv_heads: i32,
    /// Features per head.
    pub head_dim: i32,
    /// RMS norm epsilon.
    pub eps: f64,
    /// Vocabulary size.
    pub vocab_size: i32,
    /// Rope base.
    pub rope_theta: f64,
    /// Rotate adjacent pairs.
    pub rope_traditional: bool,
    /// Rope scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Tied embeddings.
    pub tie_word_embeddings: bool,
    /// Which layers use a sliding window.
    pub sliding: Vec<bool>,
    /// The window of sliding layers.
    pub sliding_window: Option<i32>,
    /// Trained context length.
    pub max_position_embeddings: Option<i32>,
    /// Architectural switches.
    pub variant: Variant,
}

impl DecoderConfig {
    /// The Llama 3 reading of a config.
    pub fn llama(config: &ModelConfig, dir: &Path) -> Result<DecoderConfig> {
        let c: Config = config.text_as(dir)?;
        let sliding = match &c.layer_types {
            Some(t) => t.iter().map(|x| x == "sliding_attention").collect(),
            None => vec![false; c.num_hidden_layers.max(0) as usize],
        };
        let theta = c.rope_scaling.as_ref().and_then(|s| s.rope_theta).unwrap_or(c.rope_theta);
        Ok(DecoderConfig {
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            intermediate_size: c.intermediate_size,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.head_dim.unwrap_or(if c.num_attention_heads > 0 {
                c.hidden_size / c.num_attention_heads
            } else {
                0
            }),
            eps: c.rms_norm_eps,
            vocab_size: c.vocab_size,
            rope_theta: theta,
            rope_traditional: c.rope_traditional,
            rope_scaling: c.rope_scaling,
            tie_word_embeddings: c.tie_word_embeddings,
            sliding,
            sliding_window: c.sliding_window,
            max_position_embeddings: c.max_position_embeddings,
            variant: Variant {
                qkv_bias: c.attention_bias,
                o_bias: c.attention_bias,
                mlp_bias: c.mlp_bias,
                qk_norm: false,
            },
        })
    }

    fn check(&self, dir: &Path) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(model_err(dir, format!("{name} = {v} must be positive")));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(model_err(dir, "num_attention_heads must be a multiple of num_key_value_heads"));
        }
        if self.sliding.len() != self.num_layers as usize {
            return Err(model_err(
                dir,
                format!("layer_types lists {} layers but num_hidden_layers is {}", self.sliding.len(), self.num_layers),
            ));
        }
        if self.sliding.iter().any(|&s| s) && self.sliding_window.is_none_or(|w| w <= 0) {
            return Err(model_err(dir, "sliding layers need a positive sliding_window"));
        }
        Ok(())
    }
}

struct Norm {
    weight: Array,
    eps: f32,
}

impl Norm {
    fn load(w: &WeightPath<'_>, dim: i32, eps: f64) -> Result<Norm> {
        Ok(Norm { weight: w.tensor("weight", &[dim])?, eps: eps as f32 })
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
    qk_norm: Option<(Norm, Norm)>,
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
        let mut q = split_heads(&q, b, l, self.n_heads)?;
        let mut k = split_heads(&k, b, l, self.n_kv_heads)?;
        let v = split_heads(&v, b, l, self.n_kv_heads)?;
        if let Some((qn, kn)) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
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
        let h = nn::swiglu(&gate, &up)?;
        self.reduce.apply(self.down_proj.forward(&h)?)
    }
}

struct Block {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
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
        let h = ops::add(x, &r)?;
        let r = self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?;
        ops::add(&h, &r)
    }
}

/// The pre-norm decoder of Llama 3, Qwen 2 and Qwen 3.
pub struct Decoder {
    cfg: DecoderConfig,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: Norm,
    lm_head: Option<Linear>,
    /// Which vocabulary rows this rank's embedding and head hold.
    vocab: Vocab,
    desc: Description,
}

impl Decoder {
    /// Builds the model from a decoder config and weights.
    pub fn load(config: &ModelConfig, cfg: DecoderConfig, weights: &Weights) -> Result<Decoder> {
        let dir = weights.dir();
        cfg.check(dir)?;
        let root = weights.root();
        let m = root.pp("model");
        let (hidden, heads, kv, hd, eps) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.eps);
        let var = cfg.variant;
        // Tensor parallelism (see `tp`): this rank's heads and MLP slice.
        let tpar = weights.tensor_parallel();
        let shard = tpar.map(|t| t.shard());
        let part = Heads::of(heads, kv, shard).map_err(|e| model_err(dir, e.to_string()))?;
        let (mlp_in, mlp_out) = tp::mlp(cfg.intermediate_size, shard).map_err(|e| model_err(dir, e.to_string()))?;
        let mut layers = Vec::with_capacity(cfg.num_layers as usize);
        for (i, &is_sliding) in cfg.sliding.iter().enumerate() {
            let lw = m.pp("layers").pp(i);
            let a = lw.pp("self_attn");
            let mw = lw.pp("mlp");
            let qk_norm = if var.qk_norm {
                Some((Norm::load(&a.pp("q_norm"), hd, eps)?, Norm::load(&a.pp("k_norm"), hd, eps)?))
            } else {
                None
            };
            layers.push(Block {
                self_attn: Attention {
                    q_proj: a.pp("q_proj").linear_split(heads * hd, hidden, var.qkv_bias, part.q(hd))?,
                    k_proj: a.pp("k_proj").linear_split(kv * hd, hidden, var.qkv_bias, part.kv(hd))?,
                    v_proj: a.pp("v_proj").linear_split(kv * hd, hidden, var.qkv_bias, part.kv(hd))?,
                    o_proj: a.pp("o_proj").linear_split(hidden, heads * hd, var.o_bias, part.o(hd, shard))?,
                    qk_norm,
                    n_heads: part.q_len,
                    n_kv_heads: part.kv_len,
                    scale: (f64::from(hd)).powf(-0.5) as f32,
                    rope: Rope::new(hd, cfg.rope_theta, cfg.rope_traditional, cfg.rope_scaling.as_ref(), dir)?,
                    qkv: None,
                    reduce: Reduce::new(tpar),
                },
                mlp: Mlp {
                    gate_proj: mw.pp("gate_proj").linear_split(cfg.intermediate_size, hidden, var.mlp_bias, mlp_in)?,
                    up_proj: mw.pp("up_proj").linear_split(cfg.intermediate_size, hidden, var.mlp_bias, mlp_in)?,
                    down_proj: mw.pp("down_proj").linear_split(hidden, cfg.intermediate_size, var.mlp_bias, mlp_out)?,
                    gate_up: None,
                    reduce: Reduce::new(tpar),
                },
                input_layernorm: Norm::load(&lw.pp("input_layernorm"), hidden, eps)?,
                post_attention_layernorm: Norm::load(&lw.pp("post_attention_layernorm"), hidden, eps)?,
                is_sliding,
            });
        }
        // The embedding and head: this rank's vocabulary rows (see `tp::Vocab`).
        let vocab = Vocab::new(cfg.vocab_size, tpar).map_err(|e| model_err(dir, e.to_string()))?;
        let (v_start, v_len) = vocab.rows();
        let embed_tokens = m.pp("embed_tokens").embedding_rows(cfg.vocab_size, hidden, v_start, v_len)?;
        let lm_head = if cfg.tie_word_embeddings {
            weights.ignore(|k| k == "lm_head.weight" || k.starts_with("lm_head."));
            None
        } else {
            Some(root.pp("lm_head").linear_split(cfg.vocab_size, hidden, false, vocab.split())?)
        };
        let norm = Norm::load(&m.pp("norm"), hidden, eps)?;
        weights.ignore(|k| k.contains("rotary_emb.inv_freq"));
        let desc = describe(
            config,
            &(cfg.vocab_size, cfg.num_layers, cfg.hidden_size, cfg.max_position_embeddings),
            embed_tokens.quantisation(),
        );
        Ok(Decoder { cfg, embed_tokens, layers, norm, lm_head, vocab, desc })
    }
}

impl LanguageModel for Decoder {
    fn forward_tapped(
        &self,
        inputs: &Array,
        caches: &mut [LayerCache],
        mut taps: Option<&mut AttentionTaps>,
    ) -> Result<Array> {
        super::check_caches(caches, self.layers.len())?;
        let mut h = self.vocab.embed(&self.embed_tokens, inputs)?;
        let n = h.dim(1)?;
        let full = self.layers.iter().position(|l| !l.is_sliding);
        let swa = self.layers.iter().position(|l| l.is_sliding);
        let full_mask = match full {
            Some(i) => caches[i].make_mask(n, None)?,
            None => Mask::None,
        };
        let swa_mask = match swa {
            Some(i) => caches[i].make_mask(n, self.cfg.sliding_window)?,
            None => Mask::None,
        };
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            let mask = if layer.is_sliding { &swa_mask } else { &full_mask };
            h = layer.forward(&h, mask, cache, taps.as_deref_mut())?;
        }
        self.head(&h)
    }

    fn make_cache(&self) -> Result<Vec<LayerCache>> {
        self.layers
            .iter()
            .map(|l| match (l.is_sliding, self.cfg.sliding_window) {
                (true, Some(w)) => Ok(LayerCache::Rotating(RotatingKvCache::new(w)?)),
                _ => Ok(LayerCache::Standard(KvCache::new())),
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
        self.vocab.embed(&self.embed_tokens, inputs)
    }

    fn runs_block_by_block(&self) -> bool {
        true
    }

    fn forward_layer(&self, layer: usize, h: &Array, cache: &mut LayerCache) -> Result<Array> {
        super::layer_index("forward_layer", layer, self.layers.len())?;
        let block = &self.layers[layer];
        let window = if block.is_sliding { self.cfg.sliding_window } else { None };
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
