// SPDX-License-Identifier: EUPL-1.2
//! The optimised BLAS that our Linux CPU binaries load ahead of the reference
//! BLAS MLX's wheel carries.
//!
//! The `mlx-cpu` wheel's `libmlx.so` needs `mlx_cpu.libs/libblas-*.so`, the
//! netlib reference BLAS (about 2 GFLOP/s for a float32 matmul on one core).
//! `cargo xtask setup` puts OpenBLAS beside the prefix, in
//! `<prefix>/../blas/lib/libopenblas.so.0`, and the build makes every binary
//! that links libmlx *also* need that library directly, with an rpath to its
//! folder. A binary's own `DT_NEEDED` libraries come before its libraries'
//! dependencies in the dynamic linker's global search order, so `libmlx.so`'s
//! `cblas_sgemm` (and the reference LAPACK's `sgemm_`) bind to OpenBLAS:
//! symbol interposition by link order, with no `LD_PRELOAD` to remember.
//!
//! Only on Linux, and only where such a library is there: macOS (Accelerate
//! under MLX's Metal build) and builds against other MLX installs are
//! untouched. `MLXR_BLAS_DIR` names another folder holding a
//! `libopenblas.so.0`, or, set to `none` (or empty), turns the link off.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::TargetOs;

/// The variable that overrides where the optimised BLAS is looked for.
pub const BLAS_DIR_ENV: &str = "MLXR_BLAS_DIR";

/// The file a BLAS folder holds: OpenBLAS under its soname.
pub const BLAS_FILE: &str = "libopenblas.so.0";

/// The BLAS folder `cargo xtask setup` writes for an MLX prefix: `blas/lib`
/// beside it (`target/mlx/blas/lib` for `target/mlx/mlx`).
pub fn setup_blas_dir(prefix: &Path) -> PathBuf {
    prefix.parent().unwrap_or(prefix).join("blas").join("lib")
}

/// The stamp `cargo xtask setup` writes beside a prefix it installed
/// (`target/mlx/.xtask-setup`), rewritten whenever setup changes the BLAS
/// folder, so builds watch it.
pub fn setup_stamp(prefix: &Path) -> PathBuf {
    prefix.parent().unwrap_or(prefix).join(".xtask-setup")
}

/// The optimised BLAS library to link for a build against `prefix` that
/// targets `os`, when there is one: `MLXR_BLAS_DIR`'s (`blas_dir_env`; `none`
/// or empty for none), else [`setup_blas_dir`]'s. `None` off Linux.
pub fn fast_blas(prefix: &Path, os: TargetOs, blas_dir_env: Option<OsString>) -> Option<PathBuf> {
    if os != TargetOs::Linux {
        return None;
    }
    let dir = match blas_dir_env {
        Some(v) if v.is_empty() || v == "none" => return None,
        Some(v) => PathBuf::from(v),
        None => setup_blas_dir(prefix),
    };
    let lib = dir.join(BLAS_FILE);
    lib.exists().then_some(lib)
}

/// The linker arguments that make a binary load `lib` ahead of libmlx's own
/// dependencies: an rpath (RUNPATH) to its folder and the library itself as
/// an input the linker keeps even though the binary calls none of its symbols
/// (`--no-as-needed`; rustc links with `--as-needed`).
pub fn blas_link_args(lib: &Path) -> Vec<String> {
    let dir = lib.parent().unwrap_or(lib);
    vec![
        format!("-Wl,--enable-new-dtags,-rpath,{}", dir.display()),
        format!("-Wl,--push-state,--no-as-needed,{},--pop-state", lib.display()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn the_setup_folder_is_beside_the_prefix() {
        assert_eq!(setup_blas_dir(Path::new("/w/target/mlx/mlx")), PathBuf::from("/w/target/mlx/blas/lib"));
    }

    #[test]
    fn only_linux_builds_with_a_library_there_link_it() {
        let tmp = std::env::temp_dir().join(format!("mlx-build-blas-{}", std::process::id()));
        let prefix = tmp.join("mlx");
        let dir = setup_blas_dir(&prefix);
        assert_eq!(fast_blas(&prefix, TargetOs::Linux, None), None, "nothing there yet");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(BLAS_FILE), b"").unwrap();
        assert_eq!(fast_blas(&prefix, TargetOs::Linux, None), Some(dir.join(BLAS_FILE)));
        assert_eq!(fast_blas(&prefix, TargetOs::MacOs, None), None);
        assert_eq!(fast_blas(&prefix, TargetOs::Other, None), None);
        assert_eq!(fast_blas(&prefix, TargetOs::Linux, Some("none".into())), None);
        assert_eq!(fast_blas(&prefix, TargetOs::Linux, Some("".into())), None);
        assert_eq!(fast_blas(&tmp, TargetOs::Linux, Some(dir.clone().into())), Some(dir.join(BLAS_FILE)));
        assert_eq!(fast_blas(&prefix, TargetOs::Linux, Some(tmp.clone().into())), None);
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn the_link_arguments_keep_the_library_and_find_it() {
        let args = blas_link_args(Path::new("/t/blas/lib/libopenblas.so.0"));
        assert_eq!(args[0], "-Wl,--enable-new-dtags,-rpath,/t/blas/lib");
        assert_eq!(args[1], "-Wl,--push-state,--no-as-needed,/t/blas/lib/libopenblas.so.0,--pop-state");
    }
}
