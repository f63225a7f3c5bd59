// SPDX-License-Identifier: EUPL-1.2
//! Finds MLX (see the `mlx-build` crate for the search order), compiles the C
//! shim in `csrc/` against it and links libmlx with an rpath to its directory
//! (and, on Linux, the optimised BLAS `cargo xtask setup` put beside it: see
//! `mlx_build::blas`).

use std::env;
use std::path::PathBuf;

const SHIM_SOURCES: &[&str] = &[
    "csrc/mlxs_core.cpp",
    "csrc/mlxs_runtime.cpp",
    "csrc/mlxs_io.cpp",
    "csrc/mlxs_random.cpp",
    "csrc/mlxs_ops.cpp",
    "csrc/mlxs_index.cpp",
    "csrc/mlxs_quant.cpp",
    "csrc/mlxs_fast.cpp",
    "csrc/mlxs_transforms.cpp",
    "csrc/mlxs_distributed.cpp",
    "csrc/mlxs_kernels.cpp",
    "csrc/mlxs_kernel_cache.cpp",
    "csrc/mlxs_kernel_check.cpp",
    "csrc/mlxs_norm_kernel.cpp",
    "csrc/mlxs_attn_kernel.cpp",
    "csrc/mlxs_rope_kernel.cpp",
    "csrc/mlxs_widen.cpp",
    "csrc/mlxs_widen_quant.cpp",
    "csrc/mlxs_cpu_fast.cpp",
];

fn main() {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-changed=build.rs");

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let prefix = match mlx_build::find(&mlx_build::workspace_of(&manifest)) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(1);
        }
    };
    let include = prefix.join("include");
    let lib = prefix.join("lib");
    println!("cargo:rerun-if-changed={}", lib.display());

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include("csrc")
        .include(&include)
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-unused-parameter")
        // MLX's CPU math (simd/math.h: exp's exponent bits read as a float
        // through a cast pointer), which mlxs_cpu_fast.cpp calls for the
        // fallback's exact angles, is only defined without strict aliasing.
        .flag_if_supported("-fno-strict-aliasing")
        .opt_level(2)
        .define("NDEBUG", None);
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        build.flag("-mmacosx-version-min=14.0");
    }
    for src in SHIM_SOURCES {
        build.file(src);
        println!("cargo:rerun-if-changed={src}");
    }
    build.compile("mlxs");

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    // dlopen/dlsym/dladdr (mlxs_kernel_cache.cpp) live in libdl before glibc 2.34.
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-lib=dylib=dl");
    }
    // This package's own tests and examples; dependants call
    // `mlx_build::rpath_for(..)` from their build scripts. On Linux, with an
    // optimised BLAS beside the prefix, these also make the binary need it, so
    // libmlx's BLAS calls bind to it ahead of the wheel's reference BLAS.
    for arg in mlx_build::link_args(&prefix) {
        println!("cargo:rustc-link-arg={arg}");
    }
    if let Some(blas) = mlx_build::linked_blas(&prefix) {
        println!("cargo:blas={}", blas.display());
    }
    println!("cargo:libdir={}", lib.display());
    println!("cargo:include={}", include.display());
    println!("cargo:prefix={}", prefix.display());
}
