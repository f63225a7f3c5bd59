// SPDX-License-Identifier: EUPL-1.2
//! Build-script helper shared by every crate that links MLX: finds the MLX
//! installation and emits the rpath so binaries run without
//! `LD_LIBRARY_PATH`.
//!
//! Search order (the first prefix with `include/mlx/mlx.h` and `lib/libmlx.*`
//! wins):
//! 1. `MLX_DIR`
//! 2. the prefix written by `cargo xtask setup` (`<workspace>/target/mlx/mlx`)
//! 3. the `mlx` package of the Python named by `MLX_PYTHON` (default `python3`)
//! 4. Homebrew (`HOMEBREW_PREFIX`, `/opt/homebrew`), then `/usr/local`
//!
//! `mlx-metal` links libmlx itself; crates whose tests, examples or binaries
//! link `mlx-metal` call [`rpath_for`] from their build script,
//! because Cargo passes a package's link arguments only to its own targets.

#![forbid(unsafe_code)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variables the search reads.
pub const ENV_VARS: &[&str] = &["MLX_DIR", "MLX_PYTHON", "HOMEBREW_PREFIX"];

/// Finds the MLX prefix, or returns the message to show (naming every place
/// looked at and the fix). `workspace` is the workspace root.
pub fn find(workspace: &Path) -> Result<PathBuf, String> {
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let mut tried: Vec<String> = Vec::new();
    find_mlx(workspace, &mut tried)?.ok_or_else(|| {
        format!(
            "\nerror: MLX 0.32.4 was not found.\n\nLooked in:\n  {}\n\n\
             Fix: run `cargo xtask setup` (installs the pinned MLX wheel into target/mlx),\n\
             or set MLX_DIR to a prefix that holds include/mlx/mlx.h and lib/libmlx.so|dylib,\n\
             or set MLX_PYTHON to a Python whose `mlx` package is installed.\n",
            tried.join("\n  ")
        )
    })
}

/// The workspace root seen from a crate under `crates/`.
pub fn workspace_of(manifest_dir: &Path) -> PathBuf {
    manifest_dir.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// For a crate whose every target links `mlx-metal`, doctests included
/// (Cargo's per-kind link arguments do not reach doctests): adds the rpath to
/// all of them. Exits the build with the search message when MLX is missing.
pub fn rpath_all() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    match find(&workspace_of(&manifest)) {
        Ok(prefix) => println!("cargo:rustc-link-arg={}", rpath_arg(&prefix.join("lib"))),
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(1);
        }
    }
}

/// For a crate whose targets of the given kinds (`"tests"`, `"examples"`,
/// `"bins"`, `"benches"`; Cargo refuses kinds the package does not have) link
/// `mlx-metal`: finds MLX and adds an rpath to its lib directory to them.
/// Exits the build with the search message when MLX is missing.
pub fn rpath_for(kinds: &[&str]) {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    match find(&workspace_of(&manifest)) {
        Ok(prefix) => {
            let lib = prefix.join("lib");
            for kind in kinds {
                println!("cargo:rustc-link-arg-{kind}={}", rpath_arg(&lib));
            }
        }
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(1);
        }
    }
}

/// The linker argument that sets an rpath to `lib` (RUNPATH on Linux, so
/// `LD_LIBRARY_PATH` can still override it).
pub fn rpath_arg(lib: &Path) -> String {
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        format!("-Wl,-rpath,{}", lib.display())
    } else {
        format!("-Wl,--enable-new-dtags,-rpath,{}", lib.display())
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

fn find_mlx(workspace: &Path, tried: &mut Vec<String>) -> Result<Option<PathBuf>, String> {
    if let Some(dir) = env::var_os("MLX_DIR") {
        let p = PathBuf::from(dir);
        if is_mlx_prefix(&p) {
            return Ok(Some(p));
        }
        // An explicit MLX_DIR that is wrong is an error, not a hint to look
        // elsewhere.
        return Err(format!(
            "\nerror: MLX_DIR={} does not hold include/mlx/mlx.h and lib/libmlx.so|dylib\n",
            p.display()
        ));
    }
    tried.push("MLX_DIR: not set".to_string());

    if let Some(p) = consider(workspace.join("target/mlx/mlx"), "cargo xtask setup prefix", tried) {
        return Ok(Some(p));
    }

    let python = env::var("MLX_PYTHON").unwrap_or_else(|_| "python3".to_string());
    match python_mlx(&python) {
        Some(p) => {
            if let Some(p) = consider(p, &format!("Python mlx package ({python})"), tried) {
                return Ok(Some(p));
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
            return Ok(Some(p));
        }
    }
    Ok(consider(PathBuf::from("/usr/local"), "/usr/local", tried))
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
