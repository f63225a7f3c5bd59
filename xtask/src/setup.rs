// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask setup`: installs the pinned MLX into `target/mlx`.
//!
//! The official wheels carry everything a native build needs
//! (`mlx/include`, `mlx/lib/libmlx.*`, `mlx/share/cmake/MLX`), so the wheel is
//! unpacked with `pip install --target` and `MLX_DIR` is `target/mlx/mlx`.
//! A stamp file records what was installed, so a second run is a no-op.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{output, python, run as run_cmd, workspace_root};

/// The pinned MLX version.
pub(crate) const MLX_VERSION: &str = "0.32.4";
const STAMP: &str = ".xtask-setup";

#[derive(Debug, Default)]
struct Options {
    cuda: Option<u32>,
    from_source: Option<PathBuf>,
    force: bool,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cuda" => {
                let v = it.next().ok_or("--cuda needs a version: 12 or 13")?;
                match v.as_str() {
                    "12" => o.cuda = Some(12),
                    "13" => o.cuda = Some(13),
                    other => return Err(format!("--cuda {other}: expected 12 or 13")),
                }
            }
            "--from-source" => {
                let v = it.next().ok_or("--from-source needs an MLX source directory")?;
                o.from_source = Some(PathBuf::from(v));
            }
            "--force" => o.force = true,
            other => return Err(format!("setup: unknown option `{other}`")),
        }
    }
    if o.cuda.is_some() && o.from_source.is_some() {
        return Err(
            "--cuda and --from-source cannot be combined (configure CUDA in the source build with MLX_BUILD_CUDA)"
                .into(),
        );
    }
    Ok(o)
}

/// The wheel that fits this machine.
fn wheel_for(cuda: Option<u32>) -> Result<String, String> {
    if let Some(v) = cuda {
        if !cfg!(target_os = "linux") {
            return Err("--cuda is for Linux with an NVIDIA GPU".into());
        }
        return Ok(format!("mlx-cuda-{v}=={MLX_VERSION}"));
    }
    if cfg!(all(target_os = "macos", target_arch = "aarch64")) {
        Ok(format!("mlx-metal=={MLX_VERSION}"))
    } else if cfg!(target_os = "linux") {
        Ok(format!("mlx-cpu=={MLX_VERSION}"))
    } else {
        Err("no official MLX wheel for this platform; build MLX from source with `cargo xtask setup --from-source DIR` or set MLX_DIR".into())
    }
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    let root = workspace_root();
    let target = root.join("target/mlx");
    let prefix = target.join("mlx");

    let wanted = match &opts.from_source {
        Some(dir) => format!("source:{}", dir.display()),
        None => wheel_for(opts.cuda)?,
    };
    let stamp = target.join(STAMP);
    let have = fs::read_to_string(&stamp).unwrap_or_default();
    let installed = have.trim() == wanted && has_mlx(&prefix);

    if installed && !opts.force {
        println!("MLX {MLX_VERSION} ({wanted}) is already installed at {}", prefix.display());
    } else {
        if target.exists() {
            fs::remove_dir_all(&target).map_err(|e| format!("could not clear {}: {e}", target.display()))?;
        }
        fs::create_dir_all(&target).map_err(|e| format!("could not create {}: {e}", target.display()))?;
        match &opts.from_source {
            Some(src) => build_from_source(src, &root, &prefix)?,
            None => install_wheel(&wanted, &target, opts.cuda.is_some())?,
        }
        if !has_mlx(&prefix) {
            return Err(format!("the install finished but {} lacks include/mlx/mlx.h or lib/libmlx", prefix.display()));
        }
        fs::write(&stamp, format!("{wanted}\n")).map_err(|e| format!("could not write {}: {e}", stamp.display()))?;
        println!("installed MLX {MLX_VERSION} ({wanted}) at {}", prefix.display());
    }

    ensure_cmake(&root)?;
    println!("MLX_DIR for other tools: {}", prefix.display());
    Ok(())
}

fn has_mlx(prefix: &Path) -> bool {
    prefix.join("include/mlx/mlx.h").is_file()
        && (prefix.join("lib/libmlx.so").is_file() || prefix.join("lib/libmlx.dylib").is_file())
}

fn pip_base() -> Result<Command, String> {
    let py = python();
    if output(Command::new(&py).args(["-m", "pip", "--version"])).is_none() {
        return Err(format!("`{py} -m pip` does not work; install Python 3 with pip (or point MLX_PYTHON at one)"));
    }
    let mut c = Command::new(py);
    c.args(["-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--root-user-action=ignore"]);
    Ok(c)
}

fn install_wheel(spec: &str, target: &Path, with_deps: bool) -> Result<(), String> {
    println!("installing {spec} into {} ...", target.display());
    let mut c = pip_base()?;
    c.arg("--target").arg(target).arg("--only-binary=:all:");
    if !with_deps {
        // The CPU and Metal wheels are self-contained; the CUDA wheel needs its
        // NVIDIA runtime packages, so pip resolves those.
        c.arg("--no-deps");
    }
    c.arg(spec);
    run_cmd(&mut c)
}

fn build_from_source(src: &Path, root: &Path, prefix: &Path) -> Result<(), String> {
    if !src.join("CMakeLists.txt").is_file() {
        return Err(format!("{} is not an MLX source tree (no CMakeLists.txt)", src.display()));
    }
    let cmake = ensure_cmake(root)?;
    let build = root.join("target/mlx-build");
    run_cmd(
        Command::new(&cmake)
            .arg("-S")
            .arg(src)
            .arg("-B")
            .arg(&build)
            .arg(format!("-DCMAKE_INSTALL_PREFIX={}", prefix.display()))
            .args([
                "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=ON",
                "-DMLX_BUILD_TESTS=OFF",
                "-DMLX_BUILD_EXAMPLES=OFF",
                "-DMLX_BUILD_BENCHMARKS=OFF",
                "-DMLX_BUILD_PYTHON_BINDINGS=OFF",
            ]),
    )?;
    run_cmd(Command::new(&cmake).arg("--build").arg(&build).args(["--parallel", "--config", "Release"]))?;
    run_cmd(Command::new(&cmake).arg("--install").arg(&build))
}

/// Returns a usable cmake: the machine's, or one installed from PyPI into
/// `target/tools/cmake` when the machine has none.
fn ensure_cmake(root: &Path) -> Result<PathBuf, String> {
    if output(Command::new("cmake").arg("--version")).is_some() {
        return Ok(PathBuf::from("cmake"));
    }
    let tools = root.join("target/tools/cmake");
    // The PyPI wheel carries the real binary under cmake/data/bin.
    let bin = tools.join("cmake/data/bin/cmake");
    if output(Command::new(&bin).arg("--version")).is_none() {
        println!("cmake not found; installing it from PyPI into {} ...", tools.display());
        let mut c = pip_base()?;
        c.arg("--target").arg(&tools).arg("--only-binary=:all:").arg("cmake");
        run_cmd(&mut c)?;
    }
    if output(Command::new(&bin).arg("--version")).is_none() {
        return Err(format!("cmake was installed but {} does not run", bin.display()));
    }
    println!("cmake: {}", bin.display());
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let o = parse(&["--cuda".into(), "13".into()]).unwrap();
        assert_eq!(o.cuda, Some(13));
        assert!(parse(&["--cuda".into(), "11".into()]).unwrap_err().contains("expected 12 or 13"));
        assert!(parse(&["--bogus".into()]).unwrap_err().contains("unknown option"));
        assert!(parse(&["--cuda".into()]).is_err());
    }

    #[test]
    fn picks_a_wheel() {
        assert_eq!(
            wheel_for(Some(12)).ok().as_deref().map(|s| s.starts_with("mlx-cuda-12==")),
            cfg!(target_os = "linux").then_some(true)
        );
        let w = wheel_for(None);
        if cfg!(target_os = "linux") {
            assert_eq!(w.unwrap(), format!("mlx-cpu=={MLX_VERSION}"));
        }
    }
}
