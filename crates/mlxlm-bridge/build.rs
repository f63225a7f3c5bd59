// SPDX-License-Identifier: EUPL-1.2
//! The tests and examples link the "metal" backend (to switch backends by
//! name): give them an rpath to libmlx.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    mlx_build::rpath_for(&["tests", "examples"]);
}
