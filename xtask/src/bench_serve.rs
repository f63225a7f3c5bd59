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
use std::process::Command;

use crate::bench::{absolute, pick_python, target_dir};
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

/// Driver options that take a value, and what the value must be.
const VALUED: &[(&str, Kind)] = &[
    ("--clients", Kind::List),
    ("--max-tokens", Kind::Tokens),
    ("--prompt-words", Kind::Count),
    ("--rounds", Kind::Count),
    ("--warmup", Kind::Count0),
    ("--ours-args", Kind::Text),
    ("--mlxlm-args", Kind::Text),
    ("--start-timeout", Kind::Seconds),
    ("--request-timeout", Kind::Seconds),
    ("--json", Kind::Path),
    ("--log-dir", Kind::Path),
];

/// Driver flags without a value (besides `--skip-ours` and `--skip-mlxlm`, which this reads too).
const FLAGS: &[&str] = &["--markdown"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// An integer >= 1.
    Count,
    /// An integer >= 0.
    Count0,
    /// An integer >= 2 (the per-stream speed needs a token after the first).
    Tokens,
    /// Comma-separated integers >= 1.
    List,
    /// A number of seconds > 0.
    Seconds,
    /// Passed on as it is (extra flags for a server, split by the driver as a shell would).
    Text,
    /// A path (made absolute, since the driver runs in the workspace root).
    Path,
}

fn check_value(name: &str, kind: Kind, v: &str) -> Result<String, String> {
    let bad = |what: &str| format!("bench-serve: {name} {v:?}: {what}");
    let whole = |min: u64| -> Result<String, String> {
        let n: u64 = v.trim().parse().map_err(|_| bad("not a whole number"))?;
        if n < min {
            return Err(bad(&format!("must be at least {min}")));
        }
        Ok(n.to_string())
    };
    match kind {
        Kind::Count => whole(1),
        Kind::Count0 => whole(0),
        Kind::Tokens => whole(2),
        Kind::List => {
            let items: Vec<u64> = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse::<u64>().ok().filter(|&n| n > 0))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("not a comma-separated list of client counts >= 1"))?;
            if items.is_empty() {
                return Err(bad("no client counts"));
            }
            Ok(items.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
        }
        Kind::Seconds => match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(v.to_string()),
            _ => Err(bad("must be a number of seconds above 0")),
        },
        Kind::Text => Ok(v.to_string()),
        Kind::Path => Ok(absolute(Path::new(v)).display().to_string()),
    }
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options { build: true, ..Options::default() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value =
            || inline.clone().or_else(|| it.next().cloned()).ok_or(format!("bench-serve: {name} needs a value"));
        match name {
            "--model" => o.model = Some(absolute(Path::new(&value()?))),
            "--python" => o.python = Some(value()?),
            "--no-build" => o.build = false,
            "--skip-ours" => o.skip_ours = true,
            "--skip-mlxlm" => o.skip_mlxlm = true,
            f if FLAGS.contains(&f) => o.driver.push(f.to_string()),
            _ => match VALUED.iter().find(|(n, _)| *n == name) {
                Some(&(n, kind)) => {
                    let v = check_value(n, kind, &value()?)?;
                    o.driver.extend([n.to_string(), v]);
                }
                None => return Err(format!("bench-serve: unknown option `{a}`")),
            },
        }
    }
    if o.model.is_none() {
        return Err("bench-serve: --model DIR is required".into());
    }
    if o.skip_ours && o.skip_mlxlm {
        return Err("bench-serve: --skip-ours and --skip-mlxlm together leave nothing to run".into());
    }
    Ok(o)
}

/// The release `mlxr` under `target`.
fn mlxr_bin(target: &Path) -> PathBuf {
    target.join("release").join(if cfg!(windows) { "mlxr.exe" } else { "mlxr" })
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let root = workspace_root();
    let model = o.model.clone().unwrap_or_default();
    if !model.join("config.json").is_file() {
        return Err(format!(
            "bench-serve: {} has no config.json (a model directory that both servers load)",
            model.display()
        ));
    }
    let mut cmd_args: Vec<std::ffi::OsString> = vec![root.join("xtask/bench/serve_bench.py").into()];
    if !o.skip_ours {
        if o.build {
            let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            run_cmd(Command::new(cargo).current_dir(&root).args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "mlxr",
                "--bin",
                "mlxr",
            ]))?;
        }
        let target = target_dir(&root, env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()).map(PathBuf::from));
        let bin = mlxr_bin(&target);
        if !bin.is_file() {
            return Err(format!("bench-serve: {} is missing (run without --no-build)", bin.display()));
        }
        cmd_args.extend(["--mlxr-bin".into(), bin.into()]);
    }
    let python = pick_python(o.python.as_deref());
    let mut cmd = Command::new(&python);
    cmd.current_dir(&root)
        .args(cmd_args)
        .arg("--model")
        .arg(&model)
        .arg("--python")
        .arg(&python)
        .args(o.skip_ours.then_some("--skip-ours"))
        .args(o.skip_mlxlm.then_some("--skip-mlxlm"))
        .args(&o.driver)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1");
    run_cmd(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

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
        let out = match Command::new("python3").arg(root.join("xtask/bench/serve_bench.py")).arg("--help").output() {
            Ok(out) => out,
            Err(e) => {
                eprintln!("note: the_driver_takes_every_option skipped: cannot run python3: {e}");
                return;
            }
        };
        assert!(out.status.success(), "serve_bench.py --help failed: {}", String::from_utf8_lossy(&out.stderr));
        let help = String::from_utf8_lossy(&out.stdout);
        let ours = ["--mlxr-bin", "--model", "--python", "--skip-ours", "--skip-mlxlm"];
        for name in VALUED.iter().map(|(n, _)| *n).chain(FLAGS.iter().copied()).chain(ours) {
            assert!(help.contains(name), "serve_bench.py --help does not mention {name}");
        }
    }
}
