// SPDX-License-Identifier: EUPL-1.2
//! Every target of this crate links libmlx through mlx-sys, the doctests too: give them all an
//! rpath to it (Cargo passes mlx-sys's link arguments only to mlx-sys's own targets).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    mlx_build::rpath_all();
}
