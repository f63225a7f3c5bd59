// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask bench-serve`: `mlxr serve` against `mlx_lm.server` on one model directory, under
//! 1 to 32 concurrent streaming clients.
//!
//! This builds `mlxr` in release (`cargo build --release -p mlxr --bin mlxr`) and hands it to the
//! driver `xtask/bench/serve_bench.py`, which starts each server in turn on a free port, drives
//! every client count through it, stops it, and prints the table and writes the JSON (aggregate
//! tok/s, time to first token p50/p95, per-stream tok/s and the ratios ours/mlx-lm). As with
//! `cargo xtask bench`, the orchestration lives in the Python driver (standard library only) so
//! that it runs alone wherever there is a prebuilt `mlxr`. docs/benchmarks.md ("Serving under
//! load") has the command and the JSON schema.

use std::env;
use std::path::{Path, PathBuf};

use crate::bench::{pick_python, target_dir};
use crate::driver::{Common, Kind, Spec};
use crate::util::{run as run_cmd, workspace_root};

/// What `cargo xtask bench-serve` takes.
#[derive(Debug, Default, PartialEq)]
struct Options {
    model: Option<PathBuf>,
    python: Option<String>,
    build: bool,
    skip_ours: bool,
    skip_mlxlm: bool,
    /// Options passed on to serve_bench.py unchanged (already checked).
    driver: Vec<String>,
}

/// The driver's options (besides `--skip-ours` and `--skip-mlxlm`, which this reads too).
const SPEC: Spec = Spec {
    tool: "bench-serve",
    valued: &[
        ("--clients", Kind::List("client counts")),
        // The per-stream speed needs a token after the first.
        ("--max-tokens", Kind::AtLeast(2)),
        ("--prompt-words", Kind::Count),
        ("--rounds", Kind::Count),
        ("--warmup", Kind::Count0),
        ("--ours-args", Kind::Text),
        ("--mlxlm-args", Kind::Text),
        ("--start-timeout", Kind::Positive("seconds")),
        ("--request-timeout", Kind::Positive("seconds")),
        ("--json", Kind::Path),
        ("--log-dir", Kind::Path),
    ],
    flags: &["--markdown"],
};

fn parse(args: &[String]) -> Result<Options, String> {
    let (mut skip_ours, mut skip_mlxlm) = (false, false);
    let common = crate::driver::parse(&SPEC, args, |flag| match flag {
        "--skip-ours" => {
            skip_ours = true;
            true
        }
        "--skip-mlxlm" => {
            skip_mlxlm = true;
            true
        }
        _ => false,
    })?;
    if skip_ours && skip_mlxlm {
        return Err("bench-serve: --skip-ours and --skip-mlxlm together leave nothing to run".into());
    }
    let Common { model, python, build, driver } = common;
    Ok(Options { model, python, build, skip_ours, skip_mlxlm, driver })
}

/// The release `mlxr` under `target`.
fn mlxr_bin(target: &Path) -> PathBuf {
    target.join("release").join(if cfg!(windows) { "mlxr.exe" } else { "mlxr" })
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let root = workspace_root();
    let model = crate::driver::model_dir(&SPEC, o.model.as_deref(), "a model directory that both servers load")?;
    let mut cmd_args: Vec<std::ffi::OsString> = Vec::new();
    if !o.skip_ours {
        if o.build {
            crate::util::build_release(&root, &["-p", "mlxr", "--bin", "mlxr"])?;
        }
        let target = target_dir(&root, env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()).map(PathBuf::from));
        let bin = mlxr_bin(&target);
        if !bin.is_file() {
            return Err(format!("bench-serve: {} is missing (run without --no-build)", bin.display()));
        }
        cmd_args.extend(["--mlxr-bin".into(), bin.into()]);
    }
    let python = pick_python(o.python.as_deref());
    let mut cmd = crate::util::python_driver(&python, &root, "xtask/bench/serve_bench.py");
    cmd.args(cmd_args)
        .arg("--model")
        .arg(&model)
        .arg("--python")
        .arg(&python)
        .args(o.skip_ours.then_some("--skip-ours"))
        .args(o.skip_mlxlm.then_some("--skip-mlxlm"))
        .args(&o.driver);
    run_cmd(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::strings as args;

    #[test]
    fn parses_options() {
        let o = parse(&args(&[
            "--model",
            "/m",
            "--clients",
            "1, 2,4",
            "--max-tokens=32",
            "--ours-args",
            "--max-batch 32",
            "--mlxlm-args=--decode-concurrency 8",
            "--markdown",
            "--rounds",
            "3",
        ]))
        .unwrap();
        assert_eq!(o.model, Some(PathBuf::from("/m")));
        assert!(o.build && o.python.is_none() && !o.skip_ours && !o.skip_mlxlm);
        assert_eq!(
            o.driver,
            args(&[
                "--clients",
                "1,2,4",
                "--max-tokens",
                "32",
                "--ours-args",
                "--max-batch 32",
                "--mlxlm-args",
                "--decode-concurrency 8",
                "--markdown",
                "--rounds",
                "3",
            ])
        );
        let o = parse(&args(&["--model=/m", "--no-build", "--python", "py", "--warmup", "0", "--skip-mlxlm"])).unwrap();
        assert!(!o.build && o.skip_mlxlm && !o.skip_ours);
        assert_eq!(o.python.as_deref(), Some("py"));
        assert_eq!(o.driver, args(&["--warmup", "0"]));
    }

    #[test]
    fn makes_paths_absolute() {
        let o = parse(&args(&["--model", "rel/m", "--json", "out.json", "--log-dir", "logs"])).unwrap();
        assert!(o.model.unwrap().is_absolute());
        assert!(Path::new(&o.driver[1]).is_absolute());
        assert!(Path::new(&o.driver[3]).is_absolute());
    }

    #[test]
    fn rejects_bad_options() {
        assert!(parse(&[]).unwrap_err().contains("--model"));
        let with = |extra: &[&str]| parse(&args(&[&["--model", "/m"], extra].concat()));
        assert!(with(&["--bogus"]).unwrap_err().contains("unknown option `--bogus`"));
        assert!(with(&["--rounds", "0"]).unwrap_err().contains("at least 1"));
        assert!(with(&["--max-tokens", "1"]).unwrap_err().contains("at least 2"));
        assert!(with(&["--prompt-words", "x"]).unwrap_err().contains("not a whole number"));
        assert!(with(&["--clients"]).unwrap_err().contains("needs a value"));
        assert!(with(&["--clients", "1,x"]).is_err());
        assert!(with(&["--clients", "0,2"]).is_err());
        assert!(with(&["--clients", ","]).unwrap_err().contains("no client counts"));
        assert!(with(&["--start-timeout", "-1"]).is_err());
        assert!(with(&["--request-timeout", "inf"]).is_err());
        assert!(with(&["--skip-ours", "--skip-mlxlm"]).unwrap_err().contains("nothing to run"));
        // bench's options are not this command's.
        assert!(with(&["--prompts", "128"]).unwrap_err().contains("unknown option"));
    }

    #[test]
    fn finds_the_binary() {
        let bin = mlxr_bin(Path::new("/t"));
        assert!(bin.starts_with("/t/release") && bin.file_stem().is_some_and(|s| s == "mlxr"));
    }

    #[test]
    fn the_driver_exists() {
        let root = workspace_root();
        for f in ["serve_bench.py", "serve_load.py"] {
            assert!(root.join("xtask/bench").join(f).is_file(), "xtask/bench/{f} is missing");
        }
        assert!(root.join("crates/cli/src/serve/mod.rs").is_file());
    }

    /// The driver's own options, from its --help, include every option this passes on.
    #[test]
    fn the_driver_takes_every_option() {
        let root = workspace_root();
        let out = match std::process::Command::new("python3")
            .arg(root.join("xtask/bench/serve_bench.py"))
            .arg("--help")
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("note: the_driver_takes_every_option skipped: cannot run python3: {e}");
                return;
            }
        };
        assert!(out.status.success(), "serve_bench.py --help failed: {}", String::from_utf8_lossy(&out.stderr));
        let help = String::from_utf8_lossy(&out.stdout);
        let ours = ["--mlxr-bin", "--model", "--python", "--skip-ours", "--skip-mlxlm"];
        for name in SPEC.valued.iter().map(|(n, _)| *n).chain(SPEC.flags.iter().copied()).chain(ours) {
            assert!(help.contains(name), "serve_bench.py --help does not mention {name}");
        }
    }
}
