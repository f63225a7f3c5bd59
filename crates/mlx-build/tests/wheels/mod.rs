// SPDX-License-Identifier: EUPL-1.2
//! The recorded file lists of MLX's wheels (`testdata/wheels/`), laid out as
//! `pip install --target` would lay them out (as empty files). Shared by
//! mlx-build's discovery tests and `xtask setup`'s tests (which include this
//! file by path).

#![allow(dead_code)]

use std::fs;
use std::path::{Component, Path, PathBuf};

/// The macOS arm64 `mlx-metal` wheel: headers, `libmlx.dylib`, `mlx.metallib`.
pub(crate) const METAL_WHEEL: &str = "mlx-metal-0.32.4-macosx-arm64.txt";
/// The macOS arm64 `mlx` wheel: the Python bindings only.
pub(crate) const MLX_WHEEL: &str = "mlx-0.32.4-cp312-macosx-arm64.txt";

/// `testdata/wheels`, found upwards from the crate being tested.
fn wheels_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|d| d.join("testdata/wheels"))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| panic!("no testdata/wheels above {}", manifest.display()))
}

/// The paths a recorded wheel holds (comment and blank lines skipped).
pub(crate) fn wheel_files(name: &str) -> Vec<String> {
    let path = wheels_dir().join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

/// Lays the recorded wheel `name` out under `target` as empty files, as
/// `pip install --target target` would (less their contents), leaving out
/// the paths in `skip`.
pub(crate) fn lay_out(target: &Path, name: &str, skip: &[&str]) {
    for f in wheel_files(name).iter().filter(|f| !skip.contains(&f.as_str())) {
        let rel = Path::new(f);
        assert!(rel.components().all(|c| matches!(c, Component::Normal(_))), "fixture path {f} is not plain");
        let path = target.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::File::create(&path).unwrap();
    }
}

/// A fresh temporary directory, removed on drop.
pub(crate) fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}
