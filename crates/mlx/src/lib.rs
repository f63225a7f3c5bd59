// SPDX-License-Identifier: EUPL-1.2
//! MLX from Rust, safely: arrays, ops, fused kernels, random numbers,
//! transforms (gradients, checkpointing, compilation), safetensors I/O,
//! memory controls, devices and MLX's distributed layer.
//!
//! This crate and `mlx-sys` (the raw declarations of our C shim over MLX C++)
//! are the only crates of the workspace with `unsafe` code; everything above
//! them is `#![forbid(unsafe_code)]`. The layers, bottom to top:
//! - `ffi` (private): the one funnel that turns a shim status into a
//!   [`Result`], and the helpers that take ownership of the handles the shim
//!   hands out.
//! - [`Array`]: an owned handle (`Drop` frees, `Clone` shares), not `Send`
//!   because MLX streams are per thread.
//! - [`ops`], [`fast`], [`random`], [`transforms`], [`io`], [`memory`],
//!   [`device`]: safe functions over arrays; errors name the op.
//! - [`blas`]: which BLAS MLX's CPU matmuls run on in this process.
//! - [`distributed`]: groups and collectives, and the launcher that starts
//!   the ranks of a job on this machine.
//!
//! ```
//! use mlx::{Array, ops};
//! let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
//! let b = ops::matmul(&a, &ops::transpose(&a, &[1, 0])?)?;
//! assert_eq!(b.to_vec::<f32>()?, vec![5.0, 11.0, 11.0, 25.0]);
//! # Ok::<(), mlx::Error>(())
//! ```

#![deny(missing_docs)]

#[macro_use]
mod macros;

mod ffi;

pub mod array;
pub mod blas;
pub mod device;
pub mod distributed;
pub mod error;
pub mod fast;
pub mod io;
pub mod memory;
pub mod ops;
pub mod random;
pub mod transforms;

pub use array::{Array, Complex64, Dtype, Element};
pub use device::{Device, mlx_version};
pub use error::{Error, Result};
