// SPDX-License-Identifier: EUPL-1.2
//! The pieces the architectures' blocks are built from, written once:
//! attention (grouped-query, optional q/k norms, rope, the KV cache, scaled
//! dot-product attention, dense or over a quantised cache) and the gated MLP;
//! the RMS norm and the residual stream between them are in [`super::norm`].
//!
//! Orthogonal concerns stay out of the model files: decode fusion (q/k/v and
//! gate/up as one matmul, [`FusedLinear`]) is held here and built by
//! [`super::LanguageModel::fuse_projections`]; tensor parallelism is applied to these pieces
//! after the model is built ([`super::tp::shard`]); attention taps are
//! recorded here when an inspection asks for them ([`AttentionTaps::capture`]).

use std::cell::RefCell;

use mlx::fast::Rotation;
use mlx::ops::Quantized;
use mlx::{Array, Dtype, Error, Result, fast, ops};

pub use super::norm::{Hidden, RmsNorm, add_norm, norm_add};
use super::rope::Rope;
use super::weights::{WeightPath, model_err};
use crate::cache::{Fetched, LayerCache, Mask, Offset};
use crate::nn::{self, FusedLinear, Linear};

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
    /// The q and k norms' weights as one `[H + H_kv, 1, D]` (each query head's
    /// row, then each key head's), for the fused path's one norm over q and k;
    /// made with `qkv` by [`Attention::fuse`].
    qk_norm_joined: Option<Array>,
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
            qk_norm_joined: None,
        })
    }

    /// The same layer with RMS norms on queries and keys, `(q_norm, k_norm)`.
    pub fn with_qk_norm(mut self, qk_norm: (RmsNorm, RmsNorm)) -> Attention {
        self.qk_norm = Some(qk_norm);
        self
    }

    /// Fuses q, k and v into one matmul for decode steps (and the q and k
    /// norms' weights into one, for the norm that step runs over both); leaves
    /// them apart when they cannot be fused ([`FusedLinear::fuse`]).
    pub(crate) fn fuse(&mut self) -> Result<()> {
        self.qkv = FusedLinear::fuse(&mut [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj])?;
        self.qk_norm_joined = match (&self.qkv, &self.qk_norm) {
            (Some(_), Some((qn, kn))) if qn.eps == kn.eps && qn.weight.dtype() == kn.weight.dtype() => {
                let d = qn.weight.dim(0)?;
                let q = ops::broadcast_to(&qn.weight, &[self.n_heads, 1, d])?;
                let k = ops::broadcast_to(&kn.weight, &[self.n_kv_heads, 1, d])?;
                Some(ops::concatenate(&[&q, &k], 0)?)
            }
            _ => None,
        };
        Ok(())
    }

    /// Attends `x: [B, L, hidden]` over the cache (which it extends) under `mask`.
    pub fn forward(&self, x: &Array, mask: &Mask, cache: &mut LayerCache) -> Result<Array> {
        let offset = cache.rope_offset()?;
        self.forward_at(x, mask, cache, &offset)
    }

    /// [`Attention::forward`] with the cache's rope offset already read.
    fn forward_at(&self, x: &Array, mask: &Mask, cache: &mut LayerCache, offset: &Offset) -> Result<Array> {
        let (b, l) = (x.dim(0)?, x.dim(1)?);
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        let qkv = match fused_for(self.qkv.as_ref(), &parts, x)? {
            Some(f) => self.rotate_fused(f, &f.forward_joined(x)?, b, l, offset)?,
            None => self.rotate(one_each(parts.iter().map(|p| p.forward(x)).collect::<Result<_>>()?)?, b, l, offset)?,
        };
        self.attend(qkv, b, l, mask, cache)
    }

    /// The residual sum before the attention and the attention on its norm:
    /// `(h, attn(norm(h)))` for the states `hidden` sum to (`h`), the values
    /// [`Hidden::sum_and_norm`] and [`Attention::forward`] give. A decode step
    /// of one sequence runs the norm and the fused q/k/v projection as one
    /// kernel on CUDA ([`FusedLinear::forward_joined_after_norm`], the same
    /// bits), and for a model without q/k norms the rope of q's and k's heads
    /// in it too.
    pub fn forward_after(
        &self,
        hidden: Hidden<'_>,
        norm: &RmsNorm,
        mask: &Mask,
        cache: &mut LayerCache,
    ) -> Result<(Array, Array)> {
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        let offset = cache.rope_offset()?;
        let rotation = self.rope.rotation(&offset);
        // Without q/k norms the kernel can rotate q's and k's heads too (one rotation for both,
        // as `rotate_fused` runs it).
        let rope = match self.qkv.as_ref() {
            Some(f) if self.qk_norm.is_none() && self.alike_heads(f) => {
                Some((self.n_heads + self.n_kv_heads, f.ends()[0] / self.n_heads, &rotation))
            }
            _ => None,
        };
        if let Some((h, fused, joined, rotated)) = joined_after(&hidden, self.qkv.as_ref(), &parts, norm, rope)? {
            let (b, l) = (h.dim(0)?, h.dim(1)?);
            let qkv = if rotated {
                self.split_rotated(fused, &joined, b, l)?
            } else {
                self.rotate_fused(fused, &joined, b, l, &offset)?
            };
            return Ok((h, self.attend(qkv, b, l, mask, cache)?));
        }
        let (h, normed) = hidden.sum_and_norm(norm)?;
        let out = self.forward_at(&normed, mask, cache, &offset)?;
        Ok((h, out))
    }

    /// Whether the fused q/k/v output `f` holds q's and k's heads side by side,
    /// all of one size, so that they are normed and rotated as one tensor.
    fn alike_heads(&self, f: &FusedLinear) -> bool {
        let ends = f.ends();
        ends.len() == 3 && ends[0] * self.n_kv_heads == (ends[1] - ends[0]) * self.n_heads
    }

    /// Attention of rotated `[q, k, v]` heads over the cache (which it
    /// extends), then the output projection.
    fn attend(&self, [q, k, v]: [Array; 3], b: i32, l: i32, mask: &Mask, cache: &mut LayerCache) -> Result<Array> {
        AttentionTaps::record(&q, &k);
        let out = match cache.update_and_fetch(&k, &v)? {
            Fetched::Dense(k, v) => {
                fast::scaled_dot_product_attention(&q, &k, &v, self.scale, mask.as_attention(), None)?
            }
            Fetched::Quantised(k, v) => quantized_attention(&q, &k, &v, self.scale, mask)?,
        };
        self.o_proj.forward(&merge_heads(&out, b, l)?)
    }

    /// `[q, k, v]` projections `[B, L, heads · D]` to heads `[B, heads, L, D]`,
    /// q and k normed (when the model has q/k norms) and rotated.
    fn rotate(&self, [q, k, v]: [Array; 3], b: i32, l: i32, offset: &Offset) -> Result<[Array; 3]> {
        let mut q = split_heads(&q, b, l, self.n_heads)?;
        let mut k = split_heads(&k, b, l, self.n_kv_heads)?;
        let v = split_heads(&v, b, l, self.n_kv_heads)?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        Ok([self.rope.apply(&q, offset)?, self.rope.apply(&k, offset)?, v])
    }

    /// The heads of the fused matmul's output `y: [B, L, (H + 2 H_kv) · D]`
    /// whose q and k the kernel has already rotated ([`joined_after`] with a
    /// rope): `[q, k, v]` as [`Attention::rotate_fused`] gives them.
    fn split_rotated(&self, f: &FusedLinear, y: &Array, b: i32, l: i32) -> Result<[Array; 3]> {
        let (heads, kv_heads, ends, last) = (self.n_heads, self.n_kv_heads, f.ends(), y.ndim() as i32 - 1);
        let qk = split_heads(&ops::slice_axis(y, last, 0, ends[1])?, b, l, heads + kv_heads)?;
        let v = split_heads(&ops::slice_axis(y, last, ends[1], ends[2])?, b, l, kv_heads)?;
        Ok([ops::slice_axis(&qk, 1, 0, heads)?, ops::slice_axis(&qk, 1, heads, heads + kv_heads)?, v])
    }

    /// [`Attention::rotate`] for the fused matmul's output `y: [B, L, (H + 2 H_kv) · D]`,
    /// where q's and k's features lie side by side: their heads are normed
    /// and rotated as one `[B, H + H_kv, L, D]` tensor, a rope (and a norm
    /// and a product) for both instead of one each, with the same result bit
    /// for bit (each head is normed and rotated on its own either way); on
    /// CUDA one kernel of ours reads them from `y` ([`Rope::norm_and_apply`]).
    fn rotate_fused(&self, f: &FusedLinear, y: &Array, b: i32, l: i32, offset: &Offset) -> Result<[Array; 3]> {
        let (heads, kv_heads) = (self.n_heads, self.n_kv_heads);
        let joined_norm = match (&self.qk_norm, &self.qk_norm_joined) {
            (None, _) => Some(None),
            // One norm over both computes in y's type: only when that is the weights' type.
            (Some((qn, _)), Some(w)) if w.dtype() == y.dtype() => Some(Some((w, qn.eps))),
            (Some(_), _) => None,
        };
        let (ends, last) = (f.ends(), y.ndim() as i32 - 1);
        let Some(norm) = joined_norm.filter(|_| self.alike_heads(f)) else {
            return self.rotate(one_each(f.split(y)?)?, b, l, offset);
        };
        let v = split_heads(&ops::slice_axis(y, last, ends[1], ends[2])?, b, l, kv_heads)?;
        // MLX's norm rounds x / rms(x) to the output type and then multiplies by the weight in it:
        // the same as the product of the unweighted norm and the joined weights that this takes.
        let qk = self.rope.norm_and_apply(y, heads + kv_heads, ends[0] / heads, norm, offset)?;
        Ok([ops::slice_axis(&qk, 1, 0, heads)?, ops::slice_axis(&qk, 1, heads, heads + kv_heads)?, v])
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
        self.finish(&gate, &up)
    }

    /// The residual sum before the MLP and the MLP on its norm: `(h,
    /// mlp(norm(h)))` for the states `hidden` sum to (`h`), the values
    /// [`Hidden::sum_and_norm`] and [`Mlp::forward`] give. A decode step of
    /// one sequence runs the norm and the fused gate and up projection as one
    /// kernel on CUDA ([`FusedLinear::forward_joined_after_norm`], the same
    /// bits).
    pub fn forward_after(&self, hidden: Hidden<'_>, norm: &RmsNorm) -> Result<(Array, Array)> {
        let parts = [&self.gate_proj, &self.up_proj];
        if let Some((h, fused, joined, _)) = joined_after(&hidden, self.gate_up.as_ref(), &parts, norm, None)? {
            let [gate, up] = one_each(fused.split(&joined)?)?;
            return Ok((h, self.finish(&gate, &up)?));
        }
        let (h, normed) = hidden.sum_and_norm(norm)?;
        Ok((h, self.forward(&normed)?))
    }

    /// The gate's activation times `up`, then the down projection.
    fn finish(&self, gate: &Array, up: &Array) -> Result<Array> {
        let h = match self.gate {
            Gate::Silu => nn::swiglu(gate, up)?,
            Gate::GeluApprox => nn::geglu_approx(gate, up)?,
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
    one_each(match fused_for(fused, &parts, x)? {
        Some(f) => f.forward(x)?,
        None => parts.iter().map(|p| p.forward(x)).collect::<Result<Vec<_>>>()?,
    })
}

/// One output for each of `N` projections. A fused layer built from other
/// parts than these is a bug: say so rather than recompute.
fn one_each<const N: usize>(out: Vec<Array>) -> Result<[Array; N]> {
    <[Array; N]>::try_from(out)
        .map_err(|o| Error::invalid("project", format!("{} outputs for {N} projections", o.len())))
}

/// `fused` when `parts` run through it on `x`: a decode step (one position per
/// sequence, at most [`FUSED_MAX_ROWS`] sequences) with no adapter on a part.
fn fused_for<'a>(fused: Option<&'a FusedLinear>, parts: &[&Linear], x: &Array) -> Result<Option<&'a FusedLinear>> {
    let rows = x.size() / (x.dim(-1)?.max(1) as usize);
    // One position per sequence: a short prompt's prefill keeps the parts' matmuls (their sums
    // are not the fused one's bit for bit on every backend, and mlx-lm does not fuse).
    let decode = x.ndim() < 3 || x.dim(-2)? == 1;
    // A part with an adapter (one served beside the model, swapped in for its step) runs alone.
    Ok(fused.filter(|_| decode && rows <= FUSED_MAX_ROWS && parts.iter().all(|p| p.lora.is_none())))
}

/// For pending states `x + r_norm(r)`: their sum and `fused` on their
/// `norm`, as one kernel where that applies (a decode step of `fused`, the
/// norms' epsilons alike, [`FusedLinear::forward_joined_after_norm`]), with
/// `rope`'s rotation of the output's first heads in it when given and that
/// applies too: `Some((sum, fused, joined output, whether rotated))`.
fn joined_after<'f>(
    hidden: &Hidden<'_>,
    fused: Option<&'f FusedLinear>,
    parts: &[&Linear],
    norm: &RmsNorm,
    rope: Option<(i32, i32, &Rotation<'_>)>,
) -> Result<Option<(Array, &'f FusedLinear, Array, bool)>> {
    let Hidden::Pending { x, r, r_norm } = hidden else { return Ok(None) };
    let Some(f) = fused_for(fused, parts, x)? else { return Ok(None) };
    if r_norm.is_some_and(|rn| rn.eps != norm.eps) {
        return Ok(None);
    }
    let norms = (r_norm.map(|rn| &rn.weight), &norm.weight, norm.eps);
    if rope.is_some()
        && let Some((h, y)) = f.forward_joined_after_norm(x, r, norms, rope)?
    {
        return Ok(Some((h, f, y, true)));
    }
    Ok(f.forward_joined_after_norm(x, r, norms, None)?.map(|(h, y)| (h, f, y, false)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::LinearWeight;
    use mlx::random;

    fn normal(shape: &[i32], dtype: Dtype, seed: u64) -> Array {
        let key = random::key(seed).unwrap();
        ops::astype(&random::normal(shape, Dtype::Float32, 0.0, 1.0, Some(&key)).unwrap(), dtype).unwrap()
    }

    /// An attention layer of 4 query and 2 key/value heads of 64 features over
    /// a width of 64, q/k/v fused, with q/k norms when `norms` is set.
    fn layer(dtype: Dtype, norms: bool, rope: Rope) -> Attention {
        let (hidden, heads, kv_heads, d) = (64, 4, 2, 64);
        let linear = |rows: i32, seed| Linear::new(LinearWeight::Dense(normal(&[rows, hidden], dtype, seed)), None);
        let norm = |seed| RmsNorm { weight: normal(&[d], dtype, seed), eps: 1e-6 };
        let mut a = Attention {
            q_proj: linear(heads * d, 1),
            k_proj: linear(kv_heads * d, 2),
            v_proj: linear(kv_heads * d, 3),
            o_proj: linear(hidden, 4),
            qk_norm: norms.then(|| (norm(5), norm(6))),
            n_heads: heads,
            n_kv_heads: kv_heads,
            scale: 0.25,
            rope,
            qkv: None,
            qk_norm_joined: None,
        };
        a.fuse().unwrap();
        a
    }

    fn bits(x: &Array) -> Vec<u32> {
        ops::astype(x, Dtype::Float32).unwrap().to_vec_f32().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn q_and_k_rotated_together_equal_each_rotated_alone_bit_for_bit() {
        let ropes = [
            Rope::Standard { dims: 64, base: 10_000.0, scale: 1.0, traditional: false },
            Rope::Standard { dims: 32, base: 500.0, scale: 0.5, traditional: true },
            Rope::Custom { dims: 64, freqs: ops::arange(1.0, 33.0, 1.0, Dtype::Float32).unwrap(), traditional: false },
        ];
        let per_row = Array::from_vec(&[0i32, 7, 300]).unwrap();
        let mut checked = 0;
        for dtype in [Dtype::Bfloat16, Dtype::Float32] {
            for norms in [false, true] {
                for rope in &ropes {
                    let a = layer(dtype, norms, rope.clone());
                    let f = a.qkv.as_ref().expect("q, k and v fuse");
                    for offset in [Offset::Fixed(5), Offset::PerRow(per_row.clone())] {
                        let x = normal(&[3, 1, 64], dtype, 7);
                        let y = f.forward_joined(&x).unwrap();
                        let together = a.rotate_fused(f, &y, 3, 1, &offset).unwrap();
                        let alone = a.rotate(one_each(f.split(&y).unwrap()).unwrap(), 3, 1, &offset).unwrap();
                        for (t, s) in together.iter().zip(&alone) {
                            assert_eq!(t.shape(), s.shape());
                            assert_eq!(t.dtype(), dtype);
                            assert_eq!(bits(t), bits(s), "{dtype:?}, norms {norms}, {rope:?}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 2 * 3 * 2 * 3);
    }

    #[test]
    fn norms_of_another_type_than_the_projections_keep_their_own_path() {
        // float32 norm weights over bfloat16 projections: MLX's norm promotes x to float32 first
        // and rounds nothing to bfloat16, which the joined norm (computing in x's type) would, so
        // the parts' path runs.
        let mut a =
            layer(Dtype::Bfloat16, true, Rope::Standard { dims: 64, base: 10_000.0, scale: 1.0, traditional: false });
        let (qn, kn) = a.qk_norm.as_mut().unwrap();
        for n in [qn, kn] {
            n.weight = ops::astype(&n.weight, Dtype::Float32).unwrap();
        }
        a.fuse().unwrap();
        let f = a.qkv.as_ref().unwrap();
        let y = f.forward_joined(&normal(&[2, 1, 64], Dtype::Bfloat16, 9)).unwrap();
        let together = a.rotate_fused(f, &y, 2, 1, &Offset::Fixed(3)).unwrap();
        let alone = a.rotate(one_each(f.split(&y).unwrap()).unwrap(), 2, 1, &Offset::Fixed(3)).unwrap();
        for (t, s) in together.iter().zip(&alone).take(2) {
            assert_eq!(t.dtype(), Dtype::Float32);
            assert_eq!(bits(t), bits(s));
        }
    }
}
