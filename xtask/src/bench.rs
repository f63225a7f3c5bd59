// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask bench`: our engine against mlx-lm on one model directory.
//!
//! This builds the measuring binary (`cargo build --release -p mlx-metal --example bench`) and
//! hands it to the driver `xtask/bench/run_all.py`, which runs both sides in one run (our binary,
//! then mlx-lm's `generate_step` in `xtask/bench/mlxlm_bench.py`, alternating over `--rounds`),
//! measures or takes the memory bandwidth, prints the table and writes the combined JSON.
//!
//! The orchestration lives in the Python driver so that it also runs where there is no cargo: on
//! the GPU machine the lead runs `python3 xtask/bench/run_all.py --bench-bin ./bench ...` with
//! the prebuilt binary. docs/benchmarks.md has the commands, the JSON schema and the roofline
//! formula.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{run as run_cmd, workspace_root};

/// What `cargo xtask bench` takes.
#[derive(Debug, Default, PartialEq)]
struct Options {
    model: Option<PathBuf>,
    python: Option<String>,
    build: bool,
    /// Options passed on to run_all.py unchanged (already checked).
    driver: Vec<String>,
}

/// Driver options that take a value, and what the value must be.
const VALUED: &[(&str, Kind)] = &[
    ("--runs", Kind::Count),
    ("--warmup", Kind::Count0),
    ("--rounds", Kind::Count),
    ("--decode", Kind::Count),
    ("--seed", Kind::Count0),
    ("--prompts", Kind::List),
    ("--bandwidth", Kind::Float),
    ("--bandwidth-size-mb", Kind::Count),
    ("--json", Kind::Path),
    ("--raw-dir", Kind::Path),
];

/// Driver flags without a value.
const FLAGS: &[&str] = &["--no-public", "--skip-ours", "--skip-mlxlm"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// An integer >= 1.
    Count,
    /// An integer >= 0.
    Count0,
    /// Comma-separated integers >= 1.
    List,
    /// A number > 0.
    Float,
    /// A path (made absolute, since the driver runs in the workspace root).
    Path,
}

fn check_value(name: &str, kind: Kind, v: &str) -> Result<String, String> {
    let bad = |what: &str| format!("bench: {name} {v:?}: {what}");
    match kind {
        Kind::Count | Kind::Count0 => {
            let n: u64 = v.parse().map_err(|_| bad("not a whole number"))?;
            if kind == Kind::Count && n == 0 {
                return Err(bad("must be at least 1"));
            }
            Ok(n.to_string())
        }
        Kind::List => {
            let items: Vec<u64> = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse::<u64>().ok().filter(|&n| n > 0))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("not a comma-separated list of lengths >= 1"))?;
            if items.is_empty() {
                return Err(bad("no lengths"));
            }
            Ok(items.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
        }
        Kind::Float => match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(v.to_string()),
            _ => Err(bad("must be a number above 0 (GB/s)")),
        },
        Kind::Path => Ok(absolute(Path::new(v)).display().to_string()),
    }
}

pub(crate) fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { env::current_dir().map(|d| d.join(p)).unwrap_or(p.to_path_buf()) }
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options { build: true, ..Options::default() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next().cloned()).ok_or(format!("bench: {name} needs a value"));
        match name {
            "--model" => o.model = Some(absolute(Path::new(&value()?))),
            "--python" => o.python = Some(value()?),
            "--no-build" => o.build = false,
            f if FLAGS.contains(&f) => o.driver.push(f.to_string()),
            _ => match VALUED.iter().find(|(n, _)| *n == name) {
                Some(&(n, kind)) => {
                    let v = check_value(n, kind, &value()?)?;
                    o.driver.extend([n.to_string(), v]);
                }
                None => return Err(format!("bench: unknown option `{a}`")),
            },
        }
    }
    if o.model.is_none() {
        return Err("bench: --model DIR is required".into());
    }
    Ok(o)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root), else `target`.
pub(crate) fn target_dir(root: &Path, var: Option<PathBuf>) -> PathBuf {
    match var {
        Some(p) if p.is_absolute() => p,
        Some(p) => root.join(p),
        None => root.join("target"),
    }
}

/// `--python`, else `MLX_PYTHON`, else the fixtures' virtualenv, else `python3`.
pub(crate) fn pick_python(given: Option<&str>) -> String {
    if let Some(p) = given {
        return p.to_owned();
    }
    if let Ok(p) = env::var("MLX_PYTHON")
        && !p.is_empty()
    {
        return p;
    }
    crate::fixtures::venv_interpreter().map(|p| p.display().to_string()).unwrap_or_else(|_| "python3".into())
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let root = workspace_root();
    let model = o.model.clone().unwrap_or_default();
    if !model.join("config.json").is_file() {
        return Err(format!(
            "bench: {} has no config.json (make one with xtask/bench/make_model.py, see docs/benchmarks.md)",
            model.display()
        ));
    }
    if o.build {
        let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run_cmd(Command::new(cargo).current_dir(&root).args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "mlx-metal",
            "--example",
            "bench",
        ]))?;
    }
    let bin = target_dir(&root, env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()).map(PathBuf::from))
        .join("release/examples")
        .join(if cfg!(windows) { "bench.exe" } else { "bench" });
    if !bin.is_file() {
        return Err(format!("bench: {} is missing (run without --no-build)", bin.display()));
    }
    let python = pick_python(o.python.as_deref());
    let mut cmd = Command::new(&python);
    cmd.current_dir(&root)
        .arg(root.join("xtask/bench/run_all.py"))
        .arg("--bench-bin")
        .arg(&bin)
        .arg("--model")
        .arg(&model)
        .arg("--python")
        .arg(&python)
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
        let o =
            parse(&args(&["--model", "/m", "--runs", "5", "--prompts=16, 32", "--no-public", "--bandwidth", "4300"]))
                .unwrap();
        assert_eq!(o.model, Some(PathBuf::from("/m")));
        assert!(o.build && o.python.is_none());
        assert_eq!(o.driver, args(&["--runs", "5", "--prompts", "16,32", "--no-public", "--bandwidth", "4300"]));
        let o = parse(&args(&["--model=/m", "--no-build", "--python", "py", "--warmup", "0"])).unwrap();
        assert!(!o.build);
        assert_eq!(o.python.as_deref(), Some("py"));
        assert_eq!(o.driver, args(&["--warmup", "0"]));
    }

    #[test]
    fn makes_paths_absolute() {
        let o = parse(&args(&["--model", "rel/m", "--json", "out.json"])).unwrap();
        assert!(o.model.unwrap().is_absolute());
        assert!(Path::new(&o.driver[1]).is_absolute());
    }

    #[test]
    fn rejects_bad_options() {
        assert!(parse(&[]).unwrap_err().contains("--model"));
        assert!(parse(&args(&["--model", "/m", "--bogus"])).unwrap_err().contains("unknown option `--bogus`"));
        assert!(parse(&args(&["--model", "/m", "--runs", "0"])).unwrap_err().contains("at least 1"));
        assert!(parse(&args(&["--model", "/m", "--runs"])).unwrap_err().contains("needs a value"));
        assert!(parse(&args(&["--model", "/m", "--prompts", "16,x"])).is_err());
        assert!(parse(&args(&["--model", "/m", "--prompts", "0"])).is_err());
        assert!(parse(&args(&["--model", "/m", "--bandwidth", "-1"])).is_err());
    }

    #[test]
    fn finds_the_target_dir() {
        let root = Path::new("/w");
        assert_eq!(target_dir(root, None), PathBuf::from("/w/target"));
        assert_eq!(target_dir(root, Some("t2".into())), PathBuf::from("/w/t2"));
        assert_eq!(target_dir(root, Some("/abs".into())), PathBuf::from("/abs"));
    }

    #[test]
    fn the_scripts_exist() {
        let root = workspace_root();
        for f in ["run_all.py", "mlxlm_bench.py", "make_model.py", "bandwidth.py", "common.py"] {
            assert!(root.join("xtask/bench").join(f).is_file(), "xtask/bench/{f} is missing");
        }
        assert!(root.join("crates/mlx-metal/examples/bench.rs").is_file());
    }
}
