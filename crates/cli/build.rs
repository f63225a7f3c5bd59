// SPDX-License-Identifier: EUPL-1.2
//! The `mlxr` binary links the "metal" backend (and so libmlx): give it and the tests an rpath to
//! libmlx, so it runs without `LD_LIBRARY_PATH`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_METAL").is_some() {
        mlx_build::rpath_for(&["bins", "tests"]);
    }
}
