// SPDX-License-Identifier: EUPL-1.2
//! Raw declarations of `csrc/mlxs.h`, the C ABI of our shim over MLX C++.
//!
//! The build script finds MLX (through `mlx-build`), compiles the shim in
//! `csrc/` against it and links libmlx with an rpath to its directory. The
//! declarations in `bindings.rs` are generated from the header by
//! `cargo xtask bindgen` and committed; their first lines record the header's
//! hash, and `tests/bindings.rs` fails when the header changed without
//! regenerating them.
//!
//! Nothing here is safe to call directly: the `mlx` crate wraps every handle
//! in an RAII type and every status in a `Result`.

#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case, missing_docs, clippy::all)]

mod bindings;

pub use bindings::*;
