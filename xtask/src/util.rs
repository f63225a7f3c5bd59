// SPDX-License-Identifier: EUPL-1.2
//! Small helpers shared by the xtask commands.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of this crate's directory).
pub(crate) fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Runs a command, inheriting stdio, and turns a failure into a message that
/// names the command.
pub(crate) fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().map_err(|e| format!("could not start {shown}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{shown} failed with {status}")) }
}

/// Runs a command and returns its standard output, or None if it could not
/// run or failed.
pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Python interpreter to use for pip: `MLX_PYTHON`, else `python3`.
pub(crate) fn python() -> String {
    std::env::var("MLX_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// 64-bit FNV-1a, used to stamp generated files with the hash of their input.
#[cfg_attr(not(feature = "bindgen"), allow(dead_code))]
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `cargo build --release --quiet` of `what` (`-p PACKAGE --bin NAME`, say) in the workspace at `root`.
pub(crate) fn build_release(root: &Path, what: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).current_dir(root).args(["build", "--release", "--quiet"]).args(what))
}

/// A command running the Python driver script `script` (under the workspace `root`) with
/// `python`, from `root`, with the environment every driver wants: no bytecode files,
/// unbuffered output, and the Hugging Face libraries kept offline.
pub(crate) fn python_driver(python: &str, root: &Path, script: &str) -> Command {
    let mut cmd = Command::new(python);
    cmd.current_dir(root)
        .arg(root.join(script))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1");
    cmd
}

/// Owned copies of `a`, as a command line's arguments arrive (for tests).
#[cfg(test)]
pub(crate) fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}
