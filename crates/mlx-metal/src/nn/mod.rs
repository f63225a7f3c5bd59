// SPDX-License-Identifier: EUPL-1.2
//! Layers shared by the models: linear and embedding layers (dense or
//! affine-quantised; [`linear`]), the LoRA layer that rides on a linear layer
//! ([`lora`]), the collectives a tensor-parallel layer ends with
//! ([`parallel`]), activations and grouped-query helpers.
//!
//! Quantisation, adapters and tensor parallelism are orthogonal to the
//! models: a layer is quantised when its weights came with `scales` (see
//! [`mlx::ops::Quantized`]), carries an adapter when one is attached, and is
//! split over ranks when `model::tp` shards the built model.

use std::cell::OnceCell;
use std::thread::LocalKey;

pub mod linear;
pub mod lora;
pub mod parallel;
mod switch;

pub use linear::{Embedding, FusedLinear, Linear, LinearWeight, NARROW_ROWS};
pub use lora::LoraLayer;
pub use parallel::{AllSum, Parallel, VocabShard};
pub use switch::SwitchLinear;

use mlx::Array;
use mlx::ops;
use mlx::transforms::{self, Closure};
use mlx::{Error, Result};

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
