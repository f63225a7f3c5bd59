// SPDX-License-Identifier: EUPL-1.2
//! Finds MLX, compiles the C shim in `csrc/` against it and links libmlx with
//! an rpath to its directory.
//!
//! Search order (the first prefix with `include/mlx/mlx.h` and `lib/libmlx.*`
//! wins):
//! 1. `MLX_DIR`
//! 2. the prefix written by `cargo xtask setup` (`<workspace>/target/mlx/mlx`)
//! 3. the `mlx` package of the Python named by `MLX_PYTHON` (default `python3`)
//! 4. Homebrew (`HOMEBREW_PREFIX`, `/opt/homebrew`), then `/usr/local`

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHIM_SOURCES: &[&str] = &["csrc/mlxs_core.cpp", "csrc/mlxs_ops.cpp", "csrc/mlxs_transforms.cpp"];

fn main() {
    for var in ["MLX_DIR", "MLX_PYTHON", "HOMEBREW_PREFIX"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-changed=build.rs");

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| manifest.clone());

    let mut tried: Vec<String> = Vec::new();
    let prefix = find_mlx(&workspace, &mut tried).unwrap_or_else(|| {
        eprintln!(
            "\nerror: MLX 0.32.4 was not found.\n\
             \n\
             Looked in:\n  {}\n\
             \n\
             Fix: run `cargo xtask setup` (installs the pinned MLX wheel into target/mlx),\n\
             or set MLX_DIR to a prefix that holds include/mlx/mlx.h and lib/libmlx.so|dylib,\n\
             or set MLX_PYTHON to a Python whose `mlx` package is installed.\n",
            tried.join("\n  ")
        );
        std::process::exit(1);
    });

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
    // An rpath for this package's own tests and examples. Dependants read
    // DEP_MLX_LIBDIR and emit the same line from their build scripts.
    emit_rpath(&lib);
    println!("cargo:libdir={}", lib.display());
    println!("cargo:include={}", include.display());
    println!("cargo:prefix={}", prefix.display());
}

fn emit_rpath(lib: &Path) {
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    } else {
        // RUNPATH (new dtags) so LD_LIBRARY_PATH can still override it.
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}", lib.display());
    }
}

fn is_mlx_prefix(p: &Path) -> bool {
    p.join("include/mlx/mlx.h").is_file() && (p.join("lib/libmlx.so").is_file() || p.join("lib/libmlx.dylib").is_file())
}

fn consider(p: PathBuf, label: &str, tried: &mut Vec<String>) -> Option<PathBuf> {
    if is_mlx_prefix(&p) {
        Some(p)
    } else {
        tried.push(format!("{label}: {}", p.display()));
        None
    }
}

fn find_mlx(workspace: &Path, tried: &mut Vec<String>) -> Option<PathBuf> {
    if let Some(dir) = env::var_os("MLX_DIR") {
        let p = PathBuf::from(dir);
        if is_mlx_prefix(&p) {
            return Some(p);
        }
        // An explicit MLX_DIR that is wrong is an error, not a hint to look
        // elsewhere: say so.
        eprintln!("\nerror: MLX_DIR={} does not hold include/mlx/mlx.h and lib/libmlx.so|dylib\n", p.display());
        std::process::exit(1);
    }
    tried.push("MLX_DIR: not set".to_string());

    if let Some(p) = consider(workspace.join("target/mlx/mlx"), "cargo xtask setup prefix", tried) {
        return Some(p);
    }

    let python = env::var("MLX_PYTHON").unwrap_or_else(|_| "python3".to_string());
    match python_mlx(&python) {
        Some(p) => {
            if let Some(p) = consider(p, &format!("Python mlx package ({python})"), tried) {
                return Some(p);
            }
        }
        None => tried.push(format!("Python mlx package ({python}): not importable")),
    }

    let mut brew = Vec::new();
    if let Some(h) = env::var_os("HOMEBREW_PREFIX") {
        brew.push(PathBuf::from(h));
    }
    brew.push(PathBuf::from("/opt/homebrew"));
    for b in brew {
        if let Some(p) = consider(b, "Homebrew", tried) {
            return Some(p);
        }
    }
    consider(PathBuf::from("/usr/local"), "/usr/local", tried)
}

fn python_mlx(python: &str) -> Option<PathBuf> {
    let out =
        Command::new(python).args(["-c", "import mlx, sys; sys.stdout.write(list(mlx.__path__)[0])"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| PathBuf::from(s))
}
