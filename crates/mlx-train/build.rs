// SPDX-License-Identifier: EUPL-1.2
//! Every target links libmlx through mlx-metal, the doctests too: give them all an rpath.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    mlx_build::rpath_all();
}
