// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask setup`: installs the pinned MLX into `target/mlx`.
//!
//! The official wheels carry everything a native build needs
//! (`mlx/include`, `mlx/lib/libmlx.*`, `mlx/share/cmake/MLX`; on macOS also
//! `mlx/lib/mlx.metallib`, the Metal kernels MLX loads from beside
//! `libmlx.dylib`), so the wheel is unpacked with `pip install --target` and
//! `MLX_DIR` is `target/mlx/mlx`. On macOS that wheel is `mlx-metal`, not
//! `mlx`: `mlx` is the Python bindings only (no headers, no library) and
//! depends on `mlx-metal`, which holds the native files and fits any Python.
//! A stamp file records what was installed, so a second run is a no-op.
//!
//! With the Linux CPU wheel, setup then puts OpenBLAS into `target/mlx/blas`
//! (`crate::blas`), which the build links ahead of the wheel's reference BLAS;
//! a missing one is a warning, never a failure.

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
    no_blas: bool,
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
            "--no-blas" => o.no_blas = true,
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

/// The wheel that fits a machine with this OS and architecture (as Rust
/// names them in `std::env::consts`: `"macos"`, `"linux"`; `"aarch64"`,
/// `"x86_64"`).
fn wheel_for(cuda: Option<u32>, os: &str, arch: &str) -> Result<String, String> {
    if let Some(v) = cuda {
        if os != "linux" {
            return Err("--cuda is for Linux with an NVIDIA GPU".into());
        }
        return Ok(format!("mlx-cuda-{v}=={MLX_VERSION}"));
    }
    if os == "macos" && arch == "aarch64" {
        Ok(format!("mlx-metal=={MLX_VERSION}"))
    } else if os == "linux" {
        Ok(format!("mlx-cpu=={MLX_VERSION}"))
    } else {
        Err("no official MLX wheel for this platform; build MLX from source with `cargo xtask setup --from-source DIR` or set MLX_DIR".into())
    }
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    let root = workspace_root();
    let target = root.join("target/mlx");
    let prefix = prefix_of(&target);
    let os = std::env::consts::OS;

    let wanted = match &opts.from_source {
        Some(dir) => format!("source:{}", dir.display()),
        None => wheel_for(opts.cuda, os, std::env::consts::ARCH)?,
    };
    let stamp = target.join(STAMP);
    let have = fs::read_to_string(&stamp).unwrap_or_default();
    let installed = have.trim() == wanted && missing_files(&prefix, os).is_empty();

    if installed && !opts.force {
        println!("MLX {MLX_VERSION} ({wanted}) is already installed at {}", prefix.display());
    } else {
        if target.exists() {
            fs::remove_dir_all(&target).map_err(|e| format!("could not clear {}: {e}", target.display()))?;
        }
        fs::create_dir_all(&target).map_err(|e| format!("could not create {}: {e}", target.display()))?;
        match &opts.from_source {
            Some(src) => build_from_source(src, &root, &prefix)?,
            None => install_wheel(&wanted, &target, opts.cuda.is_some(), os)?,
        }
        let missing = missing_files(&prefix, os);
        if !missing.is_empty() {
            return Err(format!("the install finished but {} lacks {}", prefix.display(), missing.join(", ")));
        }
        fs::write(&stamp, format!("{wanted}\n")).map_err(|e| format!("could not write {}: {e}", stamp.display()))?;
        println!("installed MLX {MLX_VERSION} ({wanted}) at {}", prefix.display());
    }

    // The optimised BLAS, for the CPU wheel on Linux only: CUDA wheels,
    // source builds and macOS's Metal (Accelerate) are left as they are.
    let cpu_wheel = os == "linux" && opts.cuda.is_none() && opts.from_source.is_none();
    let blas_changed = if cpu_wheel && !opts.no_blas {
        let cache = crate::fixtures::cache_dir().ok();
        crate::blas::ensure(&target, &root, cache.as_deref(), opts.force)
    } else {
        crate::blas::remove(&target)
    };
    if blas_changed {
        // Builds watch the stamp (`mlx_build::blas::setup_stamp`): link again.
        fs::write(&stamp, format!("{wanted}\n")).map_err(|e| format!("could not write {}: {e}", stamp.display()))?;
    }

    ensure_cmake(&root)?;
    println!("MLX_DIR for other tools: {}", prefix.display());
    Ok(())
}

/// The MLX prefix inside the `pip install --target` directory: the wheels
/// put everything under `mlx/`.
fn prefix_of(target: &Path) -> PathBuf {
    target.join("mlx")
}

/// What `prefix` lacks of the files a build on `os` needs (empty when it is
/// complete): the headers and the library, and on macOS the metallib beside
/// the library, without which every GPU operation fails at run time. The
/// build's own list (`mlx_build::required_files`), so setup and the build
/// never disagree about what an install is.
fn missing_files(prefix: &Path, os: &str) -> Vec<String> {
    match mlx_build::check_prefix(prefix, mlx_build::TargetOs::from_cfg(os)) {
        Ok(()) => Vec::new(),
        Err(incomplete) => incomplete.missing.iter().map(|r| r.any_of.join(" or ")).collect(),
    }
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

fn install_wheel(spec: &str, target: &Path, with_deps: bool, os: &str) -> Result<(), String> {
    println!("installing {spec} into {} ...", target.display());
    let mut c = pip_base()?;
    c.arg("--target").arg(target).arg("--only-binary=:all:");
    if !with_deps {
        // The CPU and Metal wheels are self-contained; the CUDA wheel needs its
        // NVIDIA runtime packages, so pip resolves those.
        c.arg("--no-deps");
    }
    c.arg(spec);
    run_cmd(&mut c).map_err(|e| if os == "macos" { format!("{e}\n{}", macos_wheel_note()) } else { e })
}

/// Why pip may find no `mlx-metal` wheel on a Mac.
fn macos_wheel_note() -> String {
    format!(
        "note: the mlx-metal {MLX_VERSION} wheel is tagged macosx_14_0_arm64: it needs macOS 14 or later on Apple \
         silicon (on older macOS pip reports `No matching distribution`); otherwise build MLX with \
         `cargo xtask setup --from-source DIR`"
    )
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
    use crate::wheels::{METAL_WHEEL, MLX_WHEEL, lay_out, scratch, wheel_files};

    #[test]
    fn parses_options() {
        let o = parse(&["--cuda".into(), "13".into()]).unwrap();
        assert_eq!(o.cuda, Some(13));
        assert!(parse(&["--cuda".into(), "11".into()]).unwrap_err().contains("expected 12 or 13"));
        assert!(parse(&["--bogus".into()]).unwrap_err().contains("unknown option"));
        assert!(parse(&["--cuda".into()]).is_err());
        assert!(parse(&["--no-blas".into()]).unwrap().no_blas);
    }

    #[test]
    fn picks_a_wheel() {
        assert_eq!(wheel_for(None, "macos", "aarch64").unwrap(), "mlx-metal==0.32.4");
        assert_eq!(wheel_for(None, "linux", "x86_64").unwrap(), "mlx-cpu==0.32.4");
        assert_eq!(wheel_for(None, "linux", "aarch64").unwrap(), "mlx-cpu==0.32.4");
        assert_eq!(wheel_for(Some(12), "linux", "x86_64").unwrap(), "mlx-cuda-12==0.32.4");
        assert_eq!(wheel_for(Some(13), "linux", "aarch64").unwrap(), "mlx-cuda-13==0.32.4");
        assert!(wheel_for(Some(13), "macos", "aarch64").unwrap_err().contains("--cuda is for Linux"));
        // No Intel-Mac or Windows wheel: the message points at a source build.
        assert!(wheel_for(None, "macos", "x86_64").unwrap_err().contains("--from-source"));
        assert!(wheel_for(None, "windows", "x86_64").unwrap_err().contains("no official MLX wheel"));
        // This machine gets its own answer.
        let here = wheel_for(None, std::env::consts::OS, std::env::consts::ARCH);
        if cfg!(target_os = "linux") {
            assert_eq!(here.unwrap(), format!("mlx-cpu=={MLX_VERSION}"));
        }
    }

    #[test]
    fn the_macos_pin_is_the_recorded_wheel() {
        let spec = wheel_for(None, "macos", "aarch64").unwrap();
        let (name, version) = spec.split_once("==").unwrap();
        // pip writes the dist-info of `mlx-metal==V` as `mlx_metal-V.dist-info`.
        let dist_info = format!("{}-{version}.dist-info/METADATA", name.replace('-', "_"));
        assert!(wheel_files(METAL_WHEEL).contains(&dist_info), "{dist_info} is not in the recorded wheel");
        assert_eq!(version, MLX_VERSION);
    }

    #[test]
    fn the_metal_wheel_installs_a_complete_macos_prefix() {
        let tmp = scratch();
        let target = tmp.path().join("target/mlx");
        lay_out(&target, METAL_WHEEL, &[]);
        let prefix = prefix_of(&target);
        assert_eq!(prefix, tmp.path().join("target/mlx/mlx"));
        assert_eq!(missing_files(&prefix, "macos"), Vec::<String>::new());
        for f in ["lib/libmlx.dylib", "lib/mlx.metallib", "include/mlx/mlx.h", "share/cmake/MLX/MLXConfig.cmake"] {
            assert!(prefix.join(f).is_file(), "{f} is not where the wheel puts it");
        }
        // A macOS prefix is no Linux prefix.
        assert_eq!(missing_files(&prefix, "linux"), ["lib/libmlx.so"]);
        assert_eq!(missing_files(&prefix, "freebsd"), Vec::<String>::new());
    }

    #[test]
    fn a_macos_install_without_the_metallib_is_not_installed() {
        let tmp = scratch();
        let target = tmp.path().join("target/mlx");
        lay_out(&target, METAL_WHEEL, &["mlx/lib/mlx.metallib"]);
        assert_eq!(missing_files(&prefix_of(&target), "macos"), ["lib/mlx.metallib"]);
        // Linux wheels have no metallib and need none.
        let linux = prefix_of(&tmp.path().join("linux"));
        for f in ["include/mlx/mlx.h", "lib/libmlx.so"] {
            fs::create_dir_all(linux.join(f).parent().unwrap()).unwrap();
            fs::File::create(linux.join(f)).unwrap();
        }
        assert_eq!(missing_files(&linux, "linux"), Vec::<String>::new());
        assert_eq!(missing_files(&linux, "macos"), ["lib/libmlx.dylib", "lib/mlx.metallib"]);
    }

    #[test]
    fn the_mlx_wheel_alone_is_not_enough_on_macos() {
        // `mlx` is the Python bindings; the native files are in `mlx-metal`.
        let tmp = scratch();
        let target = tmp.path().join("target/mlx");
        lay_out(&target, MLX_WHEEL, &[]);
        assert_eq!(
            missing_files(&prefix_of(&target), "macos"),
            ["include/mlx/mlx.h", "lib/libmlx.dylib", "lib/mlx.metallib"]
        );
        // Both together (what `pip install mlx` does) fill the same prefix.
        lay_out(&target, METAL_WHEEL, &[]);
        assert_eq!(missing_files(&prefix_of(&target), "macos"), Vec::<String>::new());
    }
}
