// SPDX-License-Identifier: EUPL-1.2
//! The `"metal"` backend: LLM inference on MLX (Metal on Apple Silicon, CUDA,
//! the CPU) on top of the safe [`mlx`] layer.
//!
//! The layers, bottom to top:
//! - [`nn`], layers (linear, embedding, the LoRA layer, fused projections)
//!   and activations. [`cache`]: KV caches. [`sample`]: mlx-lm's sampling.
//! - [`model`]: one file per architecture, reading like mlx-lm's, loading
//!   from Hugging Face safetensors (sharded, quantised, tensor-parallel),
//!   LoRA adapters ([`lora`]), converting Hugging Face checkpoints as
//!   `mlx_lm.convert` does ([`convert`]).
//! - [`tokenizer`], [`chat`]: tokenising, streaming detokenising, stop
//!   strings, chat templates.
//! - [`generate`], [`batch`], [`session`], [`speculative`]: mlx-lm's
//!   generation loop, batched prompts, chat sessions that keep their caches,
//!   speculative decoding (prompt lookup, a draft model).
//! - [`backend`]: the engine thread that owns a loaded model, and
//!   [`MetalModel`], the `Send + Sync` handle that implements
//!   `inference-core`'s traits; [`register`] adds `"metal"` to the registry.
//!
//! No `unsafe` here: everything that touches MLX goes through [`mlx`].
//!
//! ```
//! use mlx_metal::mlx::{Array, ops};
//! let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
//! let b = ops::matmul(&a, &ops::transpose(&a, &[1, 0])?)?;
//! assert_eq!(b.to_vec::<f32>()?, vec![5.0, 11.0, 11.0, 25.0]);
//! # Ok::<(), mlx_metal::Error>(())
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod backend;
pub mod batch;
pub mod bench;
pub mod cache;
pub mod chat;
pub mod constrain;
pub mod convert;
pub mod generate;
pub mod lora;
pub mod model;
pub mod nn;
mod pyrepr;
pub mod sample;
pub mod session;
pub mod speculative;
pub mod tokenizer;
pub mod workflows;

pub use backend::{MetalAdapter, MetalBackend, MetalModel, register};
pub use mlx;
pub use mlx::{Array, Dtype, Error, Result};

/// The 64-bit FNV-1a hash of `bytes` (session fingerprints, the benchmark's
/// prompt fingerprint).
pub(crate) fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
