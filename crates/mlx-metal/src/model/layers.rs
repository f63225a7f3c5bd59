// SPDX-License-Identifier: EUPL-1.2
//! The pieces the architectures' blocks are built from, written once: RMS
//! norm, attention (grouped-query, optional q/k norms, rope, the KV cache,
//! scaled dot-product attention, dense or over a quantised cache) and the
//! gated MLP.
//!
//! Orthogonal concerns stay out of the model files: decode fusion (q/k/v and
//! gate/up as one matmul, [`FusedLinear`]) is held here and built by
//! [`super::LanguageModel::fuse_projections`]; tensor parallelism is applied to these pieces
//! after the model is built ([`super::tp::shard`]); attention taps are
//! recorded here when an inspection asks for them ([`AttentionTaps::capture`]).

use std::cell::RefCell;

use mlx::ops::Quantized;
use mlx::{Array, Dtype, Error, Result, fast, ops};

use super::rope::Rope;
use super::weights::{WeightPath, model_err};
use crate::cache::{Fetched, LayerCache, Mask};
use crate::nn::{self, FusedLinear, Linear};

/// RMS norm: `x / rms(x) · w`.
pub struct RmsNorm {
    weight: Array,
    eps: f32,
}

impl RmsNorm {
    /// The norm `w` of width `dim`.
    pub fn load(w: &WeightPath<'_>, dim: i32, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: w.tensor("weight", &[dim])?, eps: eps as f32 })
    }

    /// Gemma's norm, which multiplies by `1 + w` (precomputed once, in the
    /// weight's dtype).
    pub fn load_plus_one(w: &WeightPath<'_>, dim: i32, eps: f64) -> Result<RmsNorm> {
        let raw = w.tensor("weight", &[dim])?;
        Ok(RmsNorm { weight: ops::add_scalar(&raw, 1.0)?, eps: eps as f32 })
    }

    /// Normalises the last axis of `x`.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        fast::rms_norm(x, Some(&self.weight), self.eps)
    }
}

/// The shape of an attention layer, read from a model's config.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    /// Model width.
    pub hidden: i32,
    /// Query heads.
    pub heads: i32,
    /// Key/value heads.
    pub kv_heads: i32,
    /// Features per head.
    pub head_dim: i32,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
}

impl AttentionSpec {
    /// The usual factor on `q kᵀ`: `1 / √head_dim`.
    pub fn scale(&self) -> f32 {
        f64::from(self.head_dim).powf(-0.5) as f32
    }
}

/// Multi-head attention with grouped key/value heads.
pub struct Attention {
    /// Queries.
    pub q_proj: Linear,
    /// Keys.
    pub k_proj: Linear,
    /// Values.
    pub v_proj: Linear,
    /// The output projection.
    pub o_proj: Linear,
    /// RMS norms of queries and keys per head, before rope (Qwen 3, Gemma 3).
    pub qk_norm: Option<(RmsNorm, RmsNorm)>,
    /// Query heads (this rank's, in a tensor-parallel model).
    pub n_heads: i32,
    /// Key/value heads (this rank's).
    pub n_kv_heads: i32,
    /// The factor on `q kᵀ`.
    pub scale: f32,
    /// The rotary embedding.
    pub rope: Rope,
    /// q, k and v as one matmul, for decode steps.
    pub(crate) qkv: Option<FusedLinear>,
}

impl Attention {
    /// Reads `q_proj`, `k_proj`, `v_proj` and `o_proj` under `w`.
    pub fn load(w: &WeightPath<'_>, s: &AttentionSpec, rope: Rope, scale: f32) -> Result<Attention> {
        let width = |heads: i32, what: &str| {
            heads.checked_mul(s.head_dim).ok_or_else(|| {
                let d = s.head_dim;
                model_err(
                    w.dir(),
                    format!("{what} × head_dim = {heads} × {d} is more than MLX's limit of {}", i32::MAX),
                )
            })
        };
        let (q, kv) = (width(s.heads, "num_attention_heads")?, width(s.kv_heads, "num_key_value_heads")?);
        Ok(Attention {
            q_proj: w.pp("q_proj").linear(q, s.hidden, s.qkv_bias)?,
            k_proj: w.pp("k_proj").linear(kv, s.hidden, s.qkv_bias)?,
            v_proj: w.pp("v_proj").linear(kv, s.hidden, s.qkv_bias)?,
            o_proj: w.pp("o_proj").linear(s.hidden, q, s.o_bias)?,
            qk_norm: None,
            n_heads: s.heads,
            n_kv_heads: s.kv_heads,
            scale,
            rope,
            qkv: None,
        })
    }

    /// The same layer with RMS norms on queries and keys, `(q_norm, k_norm)`.
    pub fn with_qk_norm(mut self, qk_norm: (RmsNorm, RmsNorm)) -> Attention {
        self.qk_norm = Some(qk_norm);
        self
    }

    /// Attends `x: [B, L, hidden]` over the cache (which it extends) under `mask`.
    pub fn forward(&self, x: &Array, mask: &Mask, cache: &mut LayerCache) -> Result<Array> {
        let (b, l) = (x.dim(0)?, x.dim(1)?);
        let [q, k, v] = project(self.qkv.as_ref(), [&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let mut q = split_heads(&q, b, l, self.n_heads)?;
        let mut k = split_heads(&k, b, l, self.n_kv_heads)?;
        let v = split_heads(&v, b, l, self.n_kv_heads)?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let offset = cache.rope_offset()?;
        let q = self.rope.apply(&q, &offset)?;
        let k = self.rope.apply(&k, &offset)?;
        AttentionTaps::record(&q, &k);
        let out = match cache.update_and_fetch(&k, &v)? {
            Fetched::Dense(k, v) => {
                fast::scaled_dot_product_attention(&q, &k, &v, self.scale, mask.as_attention(), None)?
            }
            Fetched::Quantised(k, v) => quantized_attention(&q, &k, &v, self.scale, mask)?,
        };
        self.o_proj.forward(&merge_heads(&out, b, l)?)
    }
}

/// Attention over quantised keys and values (mlx-lm's
/// `quantized_scaled_dot_product_attention`): `q: [B, H, L, D]` scaled, the
/// query heads grouped by key/value head through a reshape, scores and
/// output through quantised matmuls, a boolean or causal mask, and a
/// precise softmax.
fn quantized_attention(q: &Array, keys: &Quantized, values: &Quantized, scale: f32, mask: &Mask) -> Result<Array> {
    let s = q.shape();
    let (b, heads, l, d) = (s[0], s[1], s[2], s[3]);
    let kv_heads = keys.weight.dim(1)?;
    let repeats = heads / kv_heads;
    let mut q = ops::multiply_scalar(q, f64::from(scale))?;
    let grouped = |qz: &Quantized| -> Result<Quantized> {
        let e = |a: &Array| ops::expand_dims(a, &[-3]);
        Ok(Quantized {
            weight: e(&qz.weight)?,
            scales: e(&qz.scales)?,
            biases: qz.biases.as_ref().map(e).transpose()?,
            group_size: qz.group_size,
            bits: qz.bits,
        })
    };
    let (keys, values) = if repeats > 1 {
        q = ops::reshape(&q, &[b, kv_heads, repeats, l, d])?;
        (grouped(keys)?, grouped(values)?)
    } else {
        (keys.clone(), values.clone())
    };
    let mut scores = ops::quantized_matmul(&q, &keys, true)?;
    let mask = match mask {
        Mask::None => None,
        Mask::Causal => {
            let (ql, kl) = (scores.dim(-2)?, scores.dim(-1)?);
            let qi = ops::arange(f64::from(kl - ql), f64::from(kl), 1.0, Dtype::Int32)?;
            let ki = ops::arange(0.0, f64::from(kl), 1.0, Dtype::Int32)?;
            Some(ops::greater_equal(&ops::expand_dims(&qi, &[1])?, &ops::expand_dims(&ki, &[0])?)?)
        }
        Mask::Array(m) if repeats > 1 && m.ndim() > 3 => Some(ops::expand_dims(m, &[-3])?),
        Mask::Array(m) => Some(m.clone()),
    };
    if let Some(m) = mask {
        if m.dtype() == Dtype::Bool {
            let lowest = ops::scalar_like(&scores, lowest(scores.dtype()))?;
            scores = ops::where_(&m, &scores, &lowest)?;
        } else {
            scores = ops::add(&scores, &m)?;
        }
    }
    let scores = ops::softmax(&scores, &[-1], true)?;
    let out = ops::quantized_matmul(&scores, &values, false)?;
    if repeats > 1 { ops::reshape(&out, &[b, heads, l, -1]) } else { Ok(out) }
}

/// The lowest finite value of a float dtype (`mx.finfo(dtype).min`).
fn lowest(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::Float16 => -65504.0,
        // bfloat16: f32's exponent range with 8 bits of mantissa.
        Dtype::Bfloat16 => -3.389_531_389_251_535_5e38,
        Dtype::Float64 => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

/// The MLP's gate: SwiGLU (Llama, Qwen) or GELU-tanh (Gemma).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `silu(gate) · up`.
    Silu,
    /// `gelu_approx(gate) · up`.
    GeluApprox,
}

/// The gated MLP: `down(act(gate(x)) · up(x))`.
pub struct Mlp {
    /// The gate projection.
    pub gate_proj: Linear,
    /// The up projection.
    pub up_proj: Linear,
    /// The down projection.
    pub down_proj: Linear,
    /// The gate's activation.
    pub gate: Gate,
    /// gate and up as one matmul, for decode steps.
    pub(crate) gate_up: Option<FusedLinear>,
}

impl Mlp {
    /// Reads `gate_proj`, `up_proj` and `down_proj` under `w`.
    pub fn load(w: &WeightPath<'_>, hidden: i32, intermediate: i32, bias: bool, gate: Gate) -> Result<Mlp> {
        Ok(Mlp {
            gate_proj: w.pp("gate_proj").linear(intermediate, hidden, bias)?,
            up_proj: w.pp("up_proj").linear(intermediate, hidden, bias)?,
            down_proj: w.pp("down_proj").linear(hidden, intermediate, bias)?,
            gate,
            gate_up: None,
        })
    }

    /// Applies the MLP to `x: [..., hidden]`.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let [gate, up] = project(self.gate_up.as_ref(), [&self.gate_proj, &self.up_proj], x)?;
        let h = match self.gate {
            Gate::Silu => nn::swiglu(&gate, &up)?,
            Gate::GeluApprox => nn::geglu_approx(&gate, &up)?,
        };
        self.down_proj.forward(&h)
    }
}

/// `[B, L, H·D]` → `[B, H, L, D]`.
fn split_heads(x: &Array, b: i32, l: i32, heads: i32) -> Result<Array> {
    ops::transpose(&ops::reshape(x, &[b, l, heads, -1])?, &[0, 2, 1, 3])
}

/// `[B, H, L, D]` → `[B, L, H·D]`.
fn merge_heads(x: &Array, b: i32, l: i32) -> Result<Array> {
    ops::reshape(&ops::transpose(x, &[0, 2, 1, 3])?, &[b, l, -1])
}

/// The most rows of `x` that take the fused matmul: a decode step (one
/// position per sequence) of one sequence or a batch of up to 32 (the most the
/// CUDA kernel for a few rows takes), where launches and reading the weights
/// cost more than the work. Prefill takes the parts' own matmuls: the fused
/// output would need copies to split, and their matmuls are not short of work.
const FUSED_MAX_ROWS: usize = 32;

/// Runs `parts` on `x`, through `fused` (one matmul) for a decode step (one
/// position per sequence, at most [`FUSED_MAX_ROWS`] sequences) and one by
/// one otherwise.
fn project<const N: usize>(fused: Option<&FusedLinear>, parts: [&Linear; N], x: &Array) -> Result<[Array; N]> {
    let rows = x.size() / (x.dim(-1)?.max(1) as usize);
    // One position per sequence: a short prompt's prefill keeps the parts' matmuls (their sums
    // are not the fused one's bit for bit on every backend, and mlx-lm does not fuse).
    let decode = x.ndim() < 3 || x.dim(-2)? == 1;
    let out = match fused {
        // A part with an adapter (one served beside the model, swapped in for its step) runs alone.
        Some(f) if decode && rows <= FUSED_MAX_ROWS && parts.iter().all(|p| p.lora.is_none()) => f.forward(x)?,
        _ => parts.iter().map(|p| p.forward(x)).collect::<Result<Vec<_>>>()?,
    };
    // A fused layer built from other parts than these is a bug: say so rather than recompute.
    <[Array; N]>::try_from(out)
        .map_err(|o| Error::invalid("project", format!("{} outputs for {N} projections", o.len())))
}

thread_local! {
    /// The taps of the forward pass running on this thread, while
    /// [`AttentionTaps::capture`] asks for them.
    static TAPS: RefCell<Option<Vec<(Array, Array)>>> = const { RefCell::new(None) };
}

/// The post-rope queries and keys of every attention layer of one forward
/// pass, in layer order: `(queries [B, H, L, D], keys [B, H_kv, L, D])`.
#[derive(Debug, Default)]
pub struct AttentionTaps {
    /// One entry per layer.
    pub layers: Vec<(Array, Array)>,
}

impl AttentionTaps {
    /// Runs `f` (a forward pass on this thread) and returns its result with
    /// the queries and keys every attention layer computed meanwhile.
    pub fn capture<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, AttentionTaps)> {
        /// Stops recording however `f` ends (an error or a panic too).
        struct Recording;
        impl Drop for Recording {
            fn drop(&mut self) {
                TAPS.with(|t| t.borrow_mut().take());
            }
        }
        TAPS.with(|t| *t.borrow_mut() = Some(Vec::new()));
        let recording = Recording;
        let out = f()?;
        let layers = TAPS.with(|t| t.borrow_mut().take()).unwrap_or_default();
        drop(recording);
        Ok((out, AttentionTaps { layers }))
    }

    fn record(q: &Array, k: &Array) {
        TAPS.with(|t| {
            if let Some(layers) = t.borrow_mut().as_mut() {
                layers.push((q.clone(), k.clone()));
            }
        });
    }
}
