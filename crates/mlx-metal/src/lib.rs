// SPDX-License-Identifier: EUPL-1.2
//! MLX from Rust: a thin C shim over MLX C++, a safe array layer, ops, fused
//! kernels, transforms, safetensors I/O and memory controls.
//!
//! The layers, bottom to top:
//! - [`ffi`](crate) (private): the generated declarations of `csrc/mlxs.h` and
//!   the one funnel that turns a shim status into a [`Result`]. All `unsafe`
//!   lives there and in the RAII types that own shim handles.
//! - [`Array`]: an owned handle (`Drop` frees, `Clone` shares), not `Send`
//!   because MLX streams are per thread.
//! - [`ops`], [`fast`], [`random`], [`transforms`], [`io`], [`memory`],
//!   [`device`], [`nn`]: safe functions over arrays; errors name the op.
//! - [`distributed`]: MLX's distributed layer (groups, collectives, a
//!   launcher) and the tensor-parallel loading of [`model`]s.
//!
//! ```
//! use mlx_metal::{Array, ops};
//! let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
//! let b = ops::matmul(&a, &ops::transpose(&a, &[1, 0])?)?;
//! assert_eq!(b.to_vec::<f32>()?, vec![5.0, 11.0, 11.0, 25.0]);
//! # Ok::<(), mlx_metal::Error>(())
//! ```

#![deny(missing_docs)]

mod ffi;

pub mod array;
pub mod backend;
pub mod batch;
pub mod bench;
pub mod cache;
pub mod chat;
pub mod device;
pub mod distributed;
pub mod error;
pub mod fast;
pub mod generate;
pub mod io;
pub mod lora;
pub mod memory;
pub mod model;
pub mod nn;
pub mod ops;
pub mod random;
pub mod sample;
pub mod session;
pub mod tokenizer;
pub mod transforms;
pub mod workflows;

pub use array::{Array, Complex64, Dtype, Element};
pub use backend::{MetalBackend, MetalModel, register};
pub use device::{Device, mlx_version};
pub use error::{Error, Result};

/// The FNV-1a hash of `csrc/mlxs.h` recorded in the committed bindings, and
/// the one computed now: equal when the bindings are fresh.
#[doc(hidden)]
pub fn __bindings_freshness() -> (String, String) {
    let header = include_bytes!("../csrc/mlxs.h");
    let bindings = include_str!("ffi/bindings.rs");
    let recorded = bindings.lines().find_map(|l| l.strip_prefix("// header-hash: ")).unwrap_or("").to_string();
    (recorded, format!("{:016x}", fnv1a64(header.iter().copied())))
}

/// The 64-bit FNV-1a hash of `bytes` (the header hash, session fingerprints,
/// the benchmark's prompt fingerprint).
pub(crate) fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
