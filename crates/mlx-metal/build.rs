// SPDX-License-Identifier: EUPL-1.2
//! Every target of this crate links libmlx (through mlx and mlx-sys), the doctests too: give them
//! all an rpath to it.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    mlx_build::rpath_all();
}
