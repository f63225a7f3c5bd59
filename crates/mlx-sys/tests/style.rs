// SPDX-License-Identifier: EUPL-1.2
//! The C shim keeps one style, `csrc/.clang-format`, checked with the `clang-format` that the
//! fixtures' virtualenv pins (`xtask/fixtures/requirements.txt`). `cargo xtask test` points
//! `MLXR_PYTHON` at that virtualenv; without it the test says so and passes, unless
//! `MLXR_REQUIRE_REAL_MODELS=1` (set by `cargo xtask test`), which makes it fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// `clang-format` beside the fixtures' Python (`<venv>/bin/`), if there is one.
fn clang_format() -> Result<PathBuf, String> {
    let python = common::fixtures_python()?;
    let dir = python.parent().ok_or("MLXR_PYTHON has no folder")?;
    let exe = dir.join(if cfg!(windows) { "clang-format.exe" } else { "clang-format" });
    if exe.is_file() { Ok(exe) } else { Err(format!("{} does not exist", exe.display())) }
}

#[test]
fn shim_follows_its_clang_format_style() {
    let exe = match clang_format() {
        Ok(exe) => exe,
        Err(why) => return common::skip_or_fail("the shim style check", &why, true),
    };
    let csrc = Path::new(env!("CARGO_MANIFEST_DIR")).join("csrc");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&csrc)
        .expect("csrc is readable")
        .map(|e| e.expect("csrc entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "h" || x == "cpp"))
        .collect();
    sources.sort();
    assert!(
        sources.len() >= 20,
        "expected the shim's headers and sources in {}, found {}",
        csrc.display(),
        sources.len()
    );
    let out = Command::new(&exe)
        .arg("--dry-run")
        .arg("--Werror")
        .arg("--style=file")
        .args(&sources)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", exe.display()));
    assert!(
        out.status.success(),
        "the C shim differs from csrc/.clang-format; run `clang-format -i crates/mlx-sys/csrc/*.h crates/mlx-sys/csrc/*.cpp`:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
