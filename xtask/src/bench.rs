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
//! formula. On Linux with the optimised BLAS installed, a third side runs mlx-lm in our compute
//! type with that BLAS preloaded (`--same-blas`): the like-for-like ratios beside the ones
//! against mlx-lm's defaults.

use std::env;
use std::path::{Path, PathBuf};

use crate::driver::{Common, Kind, Spec};
use crate::util::{run as run_cmd, workspace_root};

/// What `cargo xtask bench` takes.
type Options = Common;

/// The driver's options.
const SPEC: Spec = Spec {
    tool: "bench",
    valued: &[
        ("--runs", Kind::Count),
        ("--warmup", Kind::Count0),
        ("--rounds", Kind::Count),
        ("--decode", Kind::Count),
        ("--seed", Kind::Count0),
        ("--prompts", Kind::List("lengths")),
        ("--bandwidth", Kind::Positive("GB/s")),
        ("--bandwidth-size-mb", Kind::Count),
        ("--json", Kind::Path),
        ("--raw-dir", Kind::Path),
    ],
    flags: &["--no-public", "--skip-ours", "--skip-mlxlm"],
};

pub(crate) fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { env::current_dir().map(|d| d.join(p)).unwrap_or(p.to_path_buf()) }
}

fn parse(args: &[String]) -> Result<Options, String> {
    crate::driver::parse(&SPEC, args, |_| false)
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
    let model = crate::driver::model_dir(
        &SPEC,
        o.model.as_deref(),
        "make one with xtask/bench/make_model.py, see docs/benchmarks.md",
    )?;
    if o.build {
        crate::util::build_release(&root, &["-p", "mlx-metal", "--example", "bench"])?;
    }
    let bin = target_dir(&root, env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()).map(PathBuf::from))
        .join("release/examples")
        .join(if cfg!(windows) { "bench.exe" } else { "bench" });
    if !bin.is_file() {
        return Err(format!("bench: {} is missing (run without --no-build)", bin.display()));
    }
    let python = pick_python(o.python.as_deref());
    let mut cmd = crate::util::python_driver(&python, &root, "xtask/bench/run_all.py");
    cmd.arg("--bench-bin").arg(&bin).arg("--model").arg(&model).arg("--python").arg(&python).args(&o.driver);
    if let Some(lib) = same_blas(&root) {
        cmd.arg("--same-blas").arg(lib);
    }
    run_cmd(&mut cmd)
}

/// The optimised BLAS our binaries link (Linux, when setup installed one or
/// `MLXR_BLAS_DIR` names one), for the like-for-like mlx-lm side: the same
/// library the build found (`mlx_build::blas::fast_blas`).
pub(crate) fn same_blas(root: &Path) -> Option<PathBuf> {
    let prefix = env::var_os("MLX_DIR").filter(|v| !v.is_empty()).map(PathBuf::from);
    let prefix = prefix.unwrap_or_else(|| root.join("target/mlx/mlx"));
    let os = mlx_build::TargetOs::from_cfg(env::consts::OS);
    mlx_build::blas::fast_blas(&prefix, os, env::var_os(mlx_build::blas::BLAS_DIR_ENV))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::strings as args;

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
