// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask test`: everything the test suite needs, then the suite.
//!
//! 1. `setup` (MLX into target/mlx; a no-op when present)
//! 2. `fixtures` (models and goldens; cached)
//! 3. `cargo test --workspace` with `MLXR_REQUIRE_REAL_MODELS=1`, so tests that
//!    need the real models fail instead of skipping, and `MLXR_PYTHON` set to the
//!    fixtures virtualenv (mlx-lm) for the mlx_lm bridge's tests.

use std::process::Command;

use crate::util::{run as run_cmd, workspace_root};

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let extra: &[String] = match args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        Some(_) => args,
        None => &[],
    };
    crate::setup::run(&[])?;
    crate::fixtures::run(&[])?;
    let python = crate::fixtures::venv_interpreter()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_cmd(
        Command::new(cargo)
            .current_dir(workspace_root())
            .env("MLXR_REQUIRE_REAL_MODELS", "1")
            .env("MLXR_PYTHON", &python)
            .args(["test", "--workspace"])
            .args(extra),
    )
}
