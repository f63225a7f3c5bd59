// SPDX-License-Identifier: EUPL-1.2
//! Array operations: creation, arithmetic and math, comparisons, reductions,
//! scans, sorting, shapes, indexing and quantisation.
//!
//! Every op is a free function that takes arrays by reference and returns a
//! new lazy [`Array`](crate::Array); bad arguments (incompatible shapes,
//! out-of-range axes, wrong dtypes) come back as an [`Error`](crate::Error)
//! that names the op. Ops run on the calling thread's current device (see
//! [`crate::device`]).
//!
//! The ops are grouped by topic in private submodules and all re-exported
//! here, so every op is `mlx::ops::name`:
//! - creation: zeros, ones, `full`, `arange`, `eye`, `tri`;
//! - elementwise: unary math, binary arithmetic and comparisons, scalars,
//!   `where_`, `clip`, `astype`;
//! - linalg: `addmm`, `tril`, `triu`, `conv2d`;
//! - reduce: reductions, arg-reductions, `softmax`, scans, sorting, top-k;
//! - shape: reshapes, transposes, joins, splits, padding, strided views;
//! - index: slices and slice updates, gathers and scatters;
//! - quant: affine quantisation and the gathered matmuls.

mod creation;
mod elementwise;
mod index;
mod linalg;
mod quant;
mod reduce;
mod shape;

pub use creation::*;
pub use elementwise::*;
pub use index::*;
pub use linalg::*;
pub use quant::*;
pub use reduce::*;
pub use shape::*;
