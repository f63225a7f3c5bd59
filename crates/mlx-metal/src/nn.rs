// SPDX-License-Identifier: EUPL-1.2
//! Layer helpers shared by the models: linear and embedding layers (dense or
//! affine-quantised), activations and grouped-query helpers.
//!
//! Quantisation is orthogonal to the models: a layer is quantised when its
//! weights came with `scales` (see [`mlx::ops::Quantized`]).

use std::cell::OnceCell;
use std::thread::LocalKey;

use crate::lora::LoraLayer;
use mlx::ops::{self, Quantized};
use mlx::transforms::{self, Closure};
use mlx::{Array, Dtype};
use mlx::{Error, Result};

/// The weights of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A dense `[out, in]` matrix.
    Dense(Array),
    /// An affine-quantised `[out, in]` matrix.
    Quantized(Quantized),
}

/// `y = x Wᵀ + b`, plus a LoRA update when an adapter is attached
/// (see [`crate::lora`]).
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weights.
    pub weight: LinearWeight,
    /// The optional bias, `[out]`.
    pub bias: Option<Array>,
    /// The optional low-rank adapter: `y += scale · (dropout(x) A) B`.
    pub lora: Option<LoraLayer>,
}

impl Linear {
    /// A dense layer; `weight` is `[out, in]`.
    pub fn dense(weight: Array, bias: Option<Array>) -> Result<Linear> {
        if weight.ndim() != 2 {
            return Err(Error::invalid(
                "linear",
                format!("weight must be 2-D [out, in], got shape {:?}", weight.shape()),
            ));
        }
        Ok(Linear { weight: LinearWeight::Dense(weight), bias, lora: None })
    }

    /// A quantised layer.
    pub fn quantized(q: Quantized, bias: Option<Array>) -> Linear {
        Linear { weight: LinearWeight::Quantized(q), bias, lora: None }
    }

    /// Applies the layer to `x: [..., in]` (as MLX's `nn.Linear` does: `addmm`
    /// when there is a bias), adding the LoRA update when there is one.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = self.forward_base(x)?;
        match &self.lora {
            Some(lora) => lora.apply(x, &y),
            None => Ok(y),
        }
    }

    /// The layer without its LoRA update.
    pub fn forward_base(&self, x: &Array) -> Result<Array> {
        match (&self.weight, &self.bias) {
            (LinearWeight::Dense(w), None) => ops::matmul(x, &ops::transpose(w, &[1, 0])?),
            (LinearWeight::Dense(w), Some(b)) => ops::addmm(b, x, &ops::transpose(w, &[1, 0])?, 1.0, 1.0),
            (LinearWeight::Quantized(q), None) => ops::quantized_matmul(x, q, true),
            (LinearWeight::Quantized(q), Some(b)) => ops::add(&ops::quantized_matmul(x, q, true)?, b),
        }
    }

    /// `(out, in)` features.
    pub fn features(&self) -> Result<(i32, i32)> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok((w.dim(0)?, w.dim(1)?)),
            LinearWeight::Quantized(q) => Ok((q.scales.dim(0)?, q.scales.dim(1)? * q.group_size)),
        }
    }

    /// The weights as a dense matrix (dequantised if needed).
    pub fn dense_weight(&self, dtype: Option<Dtype>) -> Result<Array> {
        match &self.weight {
            LinearWeight::Dense(w) => match dtype {
                Some(d) if d != w.dtype() => ops::astype(w, d),
                _ => Ok(w.clone()),
            },
            LinearWeight::Quantized(q) => ops::dequantize(q, dtype),
        }
    }
}

/// Several linear layers that read the same input, run as one matmul: the
/// attention's q, k and v projections, or an MLP's gate and up projections.
///
/// A decode step of one sequence is a chain of small kernels whose launch
/// cost exceeds their work; one matmul instead of three (or two) removes
/// those launches. The weights are stored once: [`FusedLinear::fuse`]
/// concatenates the parts' weights and then makes each part's weights a view
/// of its rows of the fused matrix, so the parts keep working on their own
/// (training, adapters, batches) with no extra memory.
#[derive(Debug, Clone)]
pub struct FusedLinear {
    fused: Linear,
    /// Where each part's outputs end along the fused output axis.
    ends: Vec<i32>,
}

impl FusedLinear {
    /// Fuses `parts` when they can run as one matmul: same input width, all
    /// dense in one dtype or all quantised alike (bits, group size, scale
    /// dtype), biases on all or none, and no LoRA adapter. Returns `None`
    /// otherwise, leaving the parts as they were.
    ///
    /// Nothing is computed here: the concatenation runs (once) when the fused
    /// layer or one of the parts is first used, so loading stays lazy.
    ///
    /// # Errors
    ///
    /// When MLX rejects the concatenation (shapes that do not fit).
    pub fn fuse(parts: &mut [&mut Linear]) -> Result<Option<FusedLinear>> {
        if parts.len() < 2 || !Self::compatible(parts)? {
            return Ok(None);
        }
        let mut ends = Vec::with_capacity(parts.len());
        let mut end = 0;
        for p in parts.iter() {
            end += p.features()?.0;
            ends.push(end);
        }
        let cat = |get: &dyn Fn(&Linear) -> Option<&Array>| -> Result<Option<Array>> {
            let arrays: Vec<&Array> = parts.iter().filter_map(|p| get(p)).collect();
            if arrays.len() != parts.len() {
                return Ok(None);
            }
            Ok(Some(ops::concatenate(&arrays, 0)?))
        };
        let bias = cat(&|l| l.bias.as_ref())?;
        let weight = match &parts[0].weight {
            LinearWeight::Dense(_) => {
                let w = cat(&|l| match &l.weight {
                    LinearWeight::Dense(w) => Some(w),
                    LinearWeight::Quantized(_) => None,
                })?;
                match w {
                    Some(w) => LinearWeight::Dense(w),
                    None => return Ok(None),
                }
            }
            LinearWeight::Quantized(q0) => {
                let quant = |get: fn(&Quantized) -> Option<&Array>| {
                    cat(&move |l| match &l.weight {
                        LinearWeight::Quantized(q) => get(q),
                        LinearWeight::Dense(_) => None,
                    })
                };
                let (Some(weight), Some(scales)) = (quant(|q| Some(&q.weight))?, quant(|q| Some(&q.scales))?) else {
                    return Ok(None);
                };
                let biases = quant(|q| q.biases.as_ref())?;
                LinearWeight::Quantized(Quantized { weight, scales, biases, group_size: q0.group_size, bits: q0.bits })
            }
        };
        let fused = Linear { weight, bias, lora: None };
        // Each part now views its rows of the fused weights.
        let mut start = 0;
        for (p, &end) in parts.iter_mut().zip(&ends) {
            let rows = |a: &Array| ops::slice_axis(a, 0, start, end);
            p.weight = match &fused.weight {
                LinearWeight::Dense(w) => LinearWeight::Dense(rows(w)?),
                LinearWeight::Quantized(q) => LinearWeight::Quantized(Quantized {
                    weight: rows(&q.weight)?,
                    scales: rows(&q.scales)?,
                    biases: q.biases.as_ref().map(&rows).transpose()?,
                    group_size: q.group_size,
                    bits: q.bits,
                }),
            };
            if let Some(b) = &fused.bias {
                p.bias = Some(rows(b)?);
            }
            start = end;
        }
        Ok(Some(FusedLinear { fused, ends }))
    }

    fn compatible(parts: &[&mut Linear]) -> Result<bool> {
        let first = &parts[0];
        let input = first.features()?.1;
        for p in parts.iter() {
            if p.lora.is_some() || p.features()?.1 != input || p.bias.is_some() != first.bias.is_some() {
                return Ok(false);
            }
            if let (Some(a), Some(b)) = (&p.bias, &first.bias)
                && a.dtype() != b.dtype()
            {
                return Ok(false);
            }
            let alike = match (&p.weight, &first.weight) {
                (LinearWeight::Dense(a), LinearWeight::Dense(b)) => a.dtype() == b.dtype(),
                (LinearWeight::Quantized(a), LinearWeight::Quantized(b)) => {
                    a.bits == b.bits
                        && a.group_size == b.group_size
                        && a.scales.dtype() == b.scales.dtype()
                        && a.biases.is_some() == b.biases.is_some()
                }
                _ => false,
            };
            if !alike {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs the fused matmul on `x: [..., in]` and returns each part's
    /// output `[..., out_i]`, in the order the parts were given.
    pub fn forward(&self, x: &Array) -> Result<Vec<Array>> {
        let y = self.fused.forward_base(x)?;
        let last = y.ndim() as i32 - 1;
        let mut out = Vec::with_capacity(self.ends.len());
        let mut start = 0;
        for &end in &self.ends {
            out.push(ops::slice_axis(&y, last, start, end)?);
            start = end;
        }
        Ok(out)
    }
}

/// A token embedding table `[vocab, dim]`, dense or quantised.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The table.
    pub weight: LinearWeight,
}

impl Embedding {
    /// Looks up `ids` (any int shape) and returns `[..., dim]`. A quantised
    /// table dequantises only the rows it gathers.
    pub fn forward(&self, ids: &Array) -> Result<Array> {
        match &self.weight {
            LinearWeight::Dense(w) => ops::take(w, ids, 0),
            LinearWeight::Quantized(q) => {
                let rows = Quantized {
                    weight: ops::take(&q.weight, ids, 0)?,
                    scales: ops::take(&q.scales, ids, 0)?,
                    biases: q.biases.as_ref().map(|b| ops::take(b, ids, 0)).transpose()?,
                    group_size: q.group_size,
                    bits: q.bits,
                };
                ops::dequantize(&rows, None)
            }
        }
    }

    /// `(group_size, bits)` when the table is quantised.
    pub fn quantisation(&self) -> Option<(i32, i32)> {
        match &self.weight {
            LinearWeight::Dense(_) => None,
            LinearWeight::Quantized(q) => Some((q.group_size, q.bits)),
        }
    }

    /// Uses the table as the output projection (tied embeddings): `x Eᵀ`.
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        Linear { weight: self.weight.clone(), bias: None, lora: None }.forward(x)
    }
}

/// An elementwise function of arrays, compiled once per thread.
type Elementwise = fn(&[Array]) -> Result<Vec<Array>>;

/// A thread's compiled function, never freed from a thread-local destructor.
///
/// MLX keeps its compile cache in a C++ `thread_local`, and the order in which
/// a thread's C++ and Rust thread-local destructors run is unspecified: freeing
/// the compiled function erases its cache entry, which after the cache's own
/// destructor is a use after free (seen as heap corruption when a test binary
/// exits). At thread exit the handle is therefore left alone; the cache frees
/// the compiled graph itself.
struct ThreadCompiled(OnceCell<Option<Closure>>);

impl Drop for ThreadCompiled {
    fn drop(&mut self) {
        if let Some(Some(c)) = self.0.take() {
            std::mem::forget(c);
        }
    }
}

thread_local! {
    static SILU: ThreadCompiled = const { ThreadCompiled(OnceCell::new()) };
    static GELU_APPROX: ThreadCompiled = const { ThreadCompiled(OnceCell::new()) };
    static SWIGLU: ThreadCompiled = const { ThreadCompiled(OnceCell::new()) };
}

/// Runs `f` compiled (shapeless, so one compilation serves every shape): MLX
/// fuses its ops into one kernel, with no intermediate arrays, as mlx-lm's
/// `@mx.compile`d activations do. Where compiling fails (MLX's compiler
/// switched off, or no JIT toolchain) the plain ops run instead.
fn fused(slot: &'static LocalKey<ThreadCompiled>, f: Elementwise, inputs: &[&Array]) -> Result<Array> {
    let out = slot.with(|cell| {
        let compiled = cell.0.get_or_init(|| Closure::new(f).and_then(|c| transforms::compile(&c, true)).ok());
        match compiled {
            Some(c) => c.call(inputs),
            None => f(&inputs.iter().map(|a| (*a).clone()).collect::<Vec<_>>()),
        }
    })?;
    out.into_iter().next().ok_or_else(|| Error::invalid("fused", "the compiled function returned nothing"))
}

fn first(xs: &[Array]) -> Result<&Array> {
    xs.first().ok_or_else(|| Error::invalid("fused", "missing input"))
}

fn second(xs: &[Array]) -> Result<&Array> {
    xs.get(1).ok_or_else(|| Error::invalid("fused", "missing second input"))
}

fn silu_plain(x: &Array) -> Result<Array> {
    ops::multiply(x, &ops::sigmoid(x)?)
}

/// GELU, tanh approximation, with MLX's order of operations.
fn gelu_approx_plain(x: &Array) -> Result<Array> {
    let x3 = ops::power(x, &ops::scalar_like(x, 3.0)?)?;
    let inner = ops::add(x, &ops::multiply_scalar(&x3, 0.044715)?)?;
    let t = ops::tanh(&ops::multiply_scalar(&inner, (2.0 / std::f64::consts::PI).sqrt())?)?;
    ops::multiply(&ops::multiply_scalar(x, 0.5)?, &ops::add_scalar(&t, 1.0)?)
}

/// `x · sigmoid(x)` (compiled).
pub fn silu(x: &Array) -> Result<Array> {
    fused(&SILU, |xs| Ok(vec![silu_plain(first(xs)?)?]), &[x])
}

/// GELU with the exact error function: `0.5 x (1 + erf(x / √2))`.
pub fn gelu(x: &Array) -> Result<Array> {
    let inner = ops::erf(&ops::multiply_scalar(x, std::f64::consts::FRAC_1_SQRT_2)?)?;
    ops::multiply(&ops::multiply_scalar(x, 0.5)?, &ops::add_scalar(&inner, 1.0)?)
}

/// GELU, tanh approximation: `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`,
/// with MLX's order of operations (so low-precision results match mlx-lm's),
/// compiled.
pub fn gelu_approx(x: &Array) -> Result<Array> {
    fused(&GELU_APPROX, |xs| Ok(vec![gelu_approx_plain(first(xs)?)?]), &[x])
}

/// The SwiGLU gate of Llama and Qwen MLPs, `silu(gate) · x`, as one compiled
/// kernel (mlx-lm's `swiglu`).
pub fn swiglu(gate: &Array, x: &Array) -> Result<Array> {
    fused(&SWIGLU, |xs| Ok(vec![ops::multiply(&silu_plain(first(xs)?)?, second(xs)?)?]), &[gate, x])
}

/// The gate of Gemma MLPs, `gelu_approx(gate) · x`: the compiled
/// [`gelu_approx`], then the product, exactly as mlx-lm's Gemma 3 MLP computes
/// it. Fusing the product into the compiled kernel as well changes how
/// bfloat16 rounds on a GPU (the fused kernel does not round the activation
/// before multiplying), and logits then drift from mlx-lm's by more than the
/// parity tolerance.
pub fn geglu_approx(gate: &Array, x: &Array) -> Result<Array> {
    ops::multiply(&gelu_approx(gate)?, x)
}

/// Repeats each of the `H_kv` heads of `x: [B, H_kv, L, D]` `n` times, giving
/// `[B, H_kv·n, L, D]` (grouped-query attention without a fused kernel).
pub fn repeat_kv(x: &Array, n: i32) -> Result<Array> {
    if n <= 1 {
        return Ok(x.clone());
    }
    let s = x.shape();
    if s.len() != 4 {
        return Err(Error::invalid("repeat_kv", format!("expected [B, H, L, D], got {s:?}")));
    }
    let e = ops::expand_dims(x, &[2])?;
    let b = ops::broadcast_to(&e, &[s[0], s[1], n, s[2], s[3]])?;
    ops::reshape(&b, &[s[0], s[1] * n, s[2], s[3]])
}

/// A bank of linear layers (mixture-of-experts experts), weights
/// `[experts, out, in]`, applied by expert index with a gathered matmul.
#[derive(Debug, Clone)]
pub struct SwitchLinear {
    /// The stacked weights, dense or quantised.
    pub weight: LinearWeight,
    /// Optional per-expert bias `[experts, out]`.
    pub bias: Option<Array>,
}

impl SwitchLinear {
    /// Applies expert `indices[...]` to `x: [..., 1, in]` (one row per selected
    /// expert, as mlx-lm's `SwitchGLU` lays it out), giving `[..., 1, out]`.
    pub fn forward(&self, x: &Array, indices: &Array, sorted_indices: bool) -> Result<Array> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => {
                let wt = ops::swapaxes(w, -1, -2)?;
                ops::gather_mm(x, &wt, None, Some(indices), sorted_indices)?
            }
            LinearWeight::Quantized(q) => ops::gather_qmm(x, q, None, Some(indices), true, sorted_indices)?,
        };
        match &self.bias {
            Some(b) => ops::add(&y, &ops::expand_dims(&ops::take(b, indices, 0)?, &[-2])?),
            None => Ok(y),
        }
    }
}
