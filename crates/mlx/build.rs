// SPDX-License-Identifier: EUPL-1.2
//! Every target of this crate links libmlx through mlx-sys, the doctests too: give them all an
//! rpath to it (Cargo passes mlx-sys's link arguments only to mlx-sys's own targets), and the
//! optimised BLAS mlx-sys linked, if any, which `mlx::blas::linked` reports.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_MLX_BLAS");
    mlx_build::rpath_all();
    println!("cargo:rustc-env=MLXR_LINKED_BLAS={}", std::env::var("DEP_MLX_BLAS").unwrap_or_default());
}
