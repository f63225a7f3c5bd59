// SPDX-License-Identifier: EUPL-1.2
//! The tests and examples link libmlx through mlx-metal: give them an rpath.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    mlx_build::rpath_for(&["tests", "examples"]);
}
