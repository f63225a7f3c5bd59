// SPDX-License-Identifier: EUPL-1.2
//! Build-script helper shared by every crate that links MLX: finds the MLX
//! installation and emits the rpath so binaries run without
//! `LD_LIBRARY_PATH`.
//!
//! Search order (the first complete prefix wins; see [`check_prefix`] for what
//! complete means on each target OS):
//! 1. `MLX_DIR`
//! 2. the prefix written by `cargo xtask setup` (`<workspace>/target/mlx/mlx`)
//! 3. the `mlx` package of the Python named by `MLX_PYTHON` (default `python3`)
//! 4. Homebrew (`HOMEBREW_PREFIX`, `/opt/homebrew`), then `/usr/local`
//!
//! [`find`] reads the environment; the search itself, [`search`] over
//! [`Places`], and the completeness check, [`check_prefix`], are pure
//! functions of paths and the target OS, so they are testable anywhere.
//!
//! `mlx-metal` links libmlx itself; crates whose tests, examples or binaries
//! link `mlx-metal` call [`rpath_for`] from their build script,
//! because Cargo passes a package's link arguments only to its own targets.
//!
//! On Linux the same link arguments ([`link_args`]) also make binaries load
//! the optimised BLAS `cargo xtask setup` put beside the prefix ahead of the
//! reference BLAS the MLX wheel carries (see [`blas`]).

#![forbid(unsafe_code)]

pub mod blas;

use std::env;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variables the search reads.
pub const ENV_VARS: &[&str] = &["MLX_DIR", "MLX_PYTHON", "HOMEBREW_PREFIX", blas::BLAS_DIR_ENV];

/// The operating system a build targets: it decides what a complete MLX
/// prefix holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetOs {
    /// macOS: `libmlx.dylib` with `mlx.metallib` beside it.
    MacOs,
    /// Linux: `libmlx.so`.
    Linux,
    /// Anything else: `libmlx.so` or `libmlx.dylib`.
    Other,
}

impl TargetOs {
    /// From a value of Cargo's `CARGO_CFG_TARGET_OS` (`"macos"`, `"linux"`, ...).
    pub fn from_cfg(target_os: &str) -> TargetOs {
        match target_os {
            "macos" => TargetOs::MacOs,
            "linux" => TargetOs::Linux,
            _ => TargetOs::Other,
        }
    }

    /// The target of the running build script (`CARGO_CFG_TARGET_OS`), or,
    /// outside a build script, the OS this code runs on.
    pub fn current() -> TargetOs {
        match env::var("CARGO_CFG_TARGET_OS") {
            Ok(os) => TargetOs::from_cfg(&os),
            Err(_) => TargetOs::from_cfg(env::consts::OS),
        }
    }
}

impl fmt::Display for TargetOs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetOs::MacOs => "macOS",
            TargetOs::Linux => "Linux",
            TargetOs::Other => "this target",
        })
    }
}

/// One file a complete MLX prefix holds: any of `any_of` (paths relative to
/// the prefix) will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Required {
    /// The paths, relative to the prefix, any one of which satisfies this.
    pub any_of: &'static [&'static str],
    /// What the file is for, for messages.
    pub what: &'static str,
}

impl fmt::Display for Required {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.any_of.join(" or "), self.what)
    }
}

const HEADERS: Required = Required { any_of: &["include/mlx/mlx.h"], what: "the C++ headers" };
const LIB_SO: Required = Required { any_of: &["lib/libmlx.so"], what: "the library" };
const LIB_DYLIB: Required = Required { any_of: &["lib/libmlx.dylib"], what: "the library" };
const LIB_ANY: Required = Required { any_of: &["lib/libmlx.so", "lib/libmlx.dylib"], what: "the library" };
const METALLIB: Required = Required {
    any_of: &["lib/mlx.metallib"],
    what: "the Metal kernels, which MLX loads from beside libmlx.dylib at run time",
};

/// The files a complete MLX prefix holds for a build that targets `os`. On
/// macOS that includes `lib/mlx.metallib`: without it everything builds and
/// links, and then the first GPU operation fails at run time. The CMake
/// config (`share/cmake/MLX`) is not required: nothing in our build reads it.
pub fn required_files(os: TargetOs) -> &'static [Required] {
    match os {
        TargetOs::MacOs => &[HEADERS, LIB_DYLIB, METALLIB],
        TargetOs::Linux => &[HEADERS, LIB_SO],
        TargetOs::Other => &[HEADERS, LIB_ANY],
    }
}

/// A prefix that lacks some of the files [`required_files`] lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomplete {
    /// The prefix that was checked.
    pub prefix: PathBuf,
    /// The target OS it was checked for.
    pub os: TargetOs,
    /// What it lacks, in the order of [`required_files`].
    pub missing: Vec<Required>,
}

impl Incomplete {
    /// Whether the prefix is not there at all (rather than incomplete).
    pub fn absent(&self) -> bool {
        !self.prefix.is_dir()
    }

    /// The missing files, as `a, b and c`, each with what it is for.
    pub fn missing_list(&self) -> String {
        and_list(self.missing.iter().map(Required::to_string).collect())
    }

    /// Whether the prefix holds none of the required files: no MLX at all,
    /// rather than an incomplete one.
    pub fn holds_none(&self) -> bool {
        self.missing.len() == required_files(self.os).len()
    }
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(mut items: Vec<String>) -> String {
    match items.pop() {
        Some(last) if items.is_empty() => last,
        Some(last) => format!("{} and {last}", items.join(", ")),
        None => String::new(),
    }
}

impl fmt::Display for Incomplete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.absent() {
            write!(f, "{} does not exist", self.prefix.display())
        } else {
            write!(
                f,
                "{} is not a complete MLX prefix for {}: it lacks {}",
                self.prefix.display(),
                self.os,
                self.missing_list()
            )
        }
    }
}

/// Checks that `prefix` holds everything a build for `os` needs
/// ([`required_files`]), and names what it lacks when it does not.
pub fn check_prefix(prefix: &Path, os: TargetOs) -> Result<(), Incomplete> {
    let missing: Vec<Required> =
        required_files(os).iter().filter(|r| !r.any_of.iter().any(|f| prefix.join(f).is_file())).copied().collect();
    if missing.is_empty() { Ok(()) } else { Err(Incomplete { prefix: prefix.to_path_buf(), os, missing }) }
}

/// The places the search looks at, in order, as read from the environment by
/// [`Places::from_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Places {
    /// `MLX_DIR`, when set: the only place looked at.
    pub mlx_dir: Option<PathBuf>,
    /// The workspace root; `cargo xtask setup` writes `target/mlx/mlx` in it.
    pub workspace: PathBuf,
    /// The Python whose `mlx` package is asked for its folder (`MLX_PYTHON`,
    /// default `python3`).
    pub python: String,
    /// The last resorts, each with its label: Homebrew (`HOMEBREW_PREFIX`,
    /// then `/opt/homebrew`), then `/usr/local`.
    pub system: Vec<(String, PathBuf)>,
}

impl Places {
    /// The places for a build in `workspace`, from `MLX_DIR`, `MLX_PYTHON`
    /// and `HOMEBREW_PREFIX`.
    pub fn from_env(workspace: &Path) -> Places {
        let mut system = Vec::new();
        if let Some(h) = env::var_os("HOMEBREW_PREFIX") {
            system.push(("Homebrew".to_string(), PathBuf::from(h)));
        }
        system.push(("Homebrew".to_string(), PathBuf::from("/opt/homebrew")));
        system.push(("/usr/local".to_string(), PathBuf::from("/usr/local")));
        Places {
            mlx_dir: env::var_os("MLX_DIR").map(PathBuf::from),
            workspace: workspace.to_path_buf(),
            python: env::var("MLX_PYTHON").unwrap_or_else(|_| "python3".to_string()),
            system,
        }
    }
}

/// Finds the MLX prefix, or returns the message to show (naming every place
/// looked at, what each lacked, and the fix). `workspace` is the workspace
/// root. Reads the environment ([`ENV_VARS`], `CARGO_CFG_TARGET_OS`); the
/// search itself is [`search`].
pub fn find(workspace: &Path) -> Result<PathBuf, String> {
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    search(&Places::from_env(workspace), TargetOs::current(), python_mlx)
}

/// The search over `places` for a build that targets `os`: the first
/// complete prefix ([`check_prefix`]) wins. `python_mlx` answers the folders
/// of the `mlx` package of the Python it is given (none when that Python has
/// no `mlx`); it is called only when the places before it failed.
pub fn search(places: &Places, os: TargetOs, python_mlx: impl FnOnce(&str) -> Vec<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = &places.mlx_dir {
        // An explicit MLX_DIR that is wrong is an error, not a hint to look
        // elsewhere.
        return match check_prefix(p, os) {
            Ok(()) => Ok(p.clone()),
            Err(e) if e.absent() => Err(format!("\nerror: MLX_DIR={} does not exist\n", p.display())),
            Err(e) => Err(format!(
                "\nerror: MLX_DIR={} is not a complete MLX prefix for {os}: it lacks {}\n",
                p.display(),
                e.missing_list()
            )),
        };
    }
    let mut tried = vec!["MLX_DIR: not set".to_string()];

    if let Some(p) =
        consider(places.workspace.join("target/mlx/mlx"), "cargo xtask setup prefix", NO_MLX, os, &mut tried)
    {
        return Ok(p);
    }
    let python = &places.python;
    let folders = python_mlx(python);
    if folders.is_empty() {
        tried.push(format!("Python mlx package ({python}): not importable"));
    }
    for p in folders {
        if let Some(p) = consider(p, &format!("Python mlx package ({python})"), BINDINGS_ONLY, os, &mut tried) {
            return Ok(p);
        }
    }
    for (label, p) in &places.system {
        if let Some(p) = consider(p.clone(), label, NO_MLX, os, &mut tried) {
            return Ok(p);
        }
    }

    let needs = and_list(required_files(os).iter().map(|r| r.any_of.join("|")).collect());
    Err(format!(
        "\nerror: MLX 0.32.4 was not found.\n\nLooked in:\n  {}\n\n\
         Fix: run `cargo xtask setup` (installs the pinned MLX wheel into target/mlx; `--force` reinstalls),\n\
         or set MLX_DIR to a prefix that holds {},\n\
         or set MLX_PYTHON to a Python whose `mlx` package is installed.\n",
        tried.join("\n  "),
        needs
    ))
}

/// The workspace root seen from a crate under `crates/`.
pub fn workspace_of(manifest_dir: &Path) -> PathBuf {
    manifest_dir.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// For a crate whose every target links `mlx-metal`, doctests included
/// (Cargo's per-kind link arguments do not reach doctests): adds the
/// [`link_args`] to all of them. Exits the build with the search message when
/// MLX is missing.
pub fn rpath_all() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    match find(&workspace_of(&manifest)) {
        Ok(prefix) => {
            for arg in link_args(&prefix) {
                println!("cargo:rustc-link-arg={arg}");
            }
        }
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(1);
        }
    }
}

/// For a crate whose targets of the given kinds (`"tests"`, `"examples"`,
/// `"bins"`, `"benches"`; Cargo refuses kinds the package does not have) link
/// `mlx-metal`: finds MLX and adds the [`link_args`] to them.
/// Exits the build with the search message when MLX is missing.
pub fn rpath_for(kinds: &[&str]) {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    match find(&workspace_of(&manifest)) {
        Ok(prefix) => {
            let args = link_args(&prefix);
            for kind in kinds {
                for arg in &args {
                    println!("cargo:rustc-link-arg-{kind}={arg}");
                }
            }
        }
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(1);
        }
    }
}

/// The optimised BLAS a build against `prefix` links, if any
/// ([`blas::fast_blas`] for the target OS and `MLXR_BLAS_DIR`). Tells Cargo
/// to build again when the library appears, goes or changes.
pub fn linked_blas(prefix: &Path) -> Option<PathBuf> {
    let os = TargetOs::current();
    let env_dir = env::var_os(blas::BLAS_DIR_ENV);
    if os == TargetOs::Linux && env_dir.is_none() {
        // Setup rewrites its stamp whenever it changes the BLAS folder. (A
        // path that does not exist would make Cargo rerun every build.)
        let stamp = blas::setup_stamp(prefix);
        if stamp.is_file() {
            println!("cargo:rerun-if-changed={}", stamp.display());
        }
    }
    let lib = blas::fast_blas(prefix, os, env_dir)?;
    println!("cargo:rerun-if-changed={}", lib.display());
    Some(lib)
}

/// Every linker argument a binary that links libmlx from `prefix` needs: the
/// rpath to `<prefix>/lib`, and on Linux, when there is an optimised BLAS
/// ([`linked_blas`]), its rpath and the library itself ([`blas::blas_link_args`]).
pub fn link_args(prefix: &Path) -> Vec<String> {
    let mut args = vec![rpath_arg(&prefix.join("lib"))];
    if let Some(lib) = linked_blas(prefix) {
        args.extend(blas::blas_link_args(&lib));
    }
    args
}

/// The linker argument that sets an rpath to `lib` (RUNPATH on Linux, so
/// `LD_LIBRARY_PATH` can still override it).
pub fn rpath_arg(lib: &Path) -> String {
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        format!("-Wl,-rpath,{}", lib.display())
    } else {
        format!("-Wl,--enable-new-dtags,-rpath,{}", lib.display())
    }
}

/// What a place that holds no MLX at all is.
const NO_MLX: &str = "no MLX there";
/// What a Python `mlx` package without the native files is.
const BINDINGS_ONLY: &str = "the Python bindings only: the headers and libmlx come in the mlx-metal, mlx-cpu or \
                             mlx-cuda-* wheel, which `pip install mlx` on macOS or `pip install mlx[cpu]` on Linux \
                             brings in";

/// `p` when it is a complete prefix; otherwise notes in `tried` where it was
/// and why it did not do.
/// `empty` says what a prefix that holds none of the files is instead.
fn consider(p: PathBuf, label: &str, empty: &str, os: TargetOs, tried: &mut Vec<String>) -> Option<PathBuf> {
    match check_prefix(&p, os) {
        Ok(()) => Some(p),
        Err(e) if e.absent() => {
            tried.push(format!("{label}: {} (not there)", p.display()));
            None
        }
        Err(e) if e.holds_none() => {
            tried.push(format!("{label}: {} ({empty})", p.display()));
            None
        }
        Err(e) => {
            tried.push(format!("{label}: {} (lacks {})", p.display(), e.missing_list()));
            None
        }
    }
}

/// The folders of the `mlx` package of `python` (more than one when the
/// package is split over several `sys.path` entries: `mlx` and `mlx-metal`
/// are separate wheels that share the `mlx/` folder and neither has an
/// `__init__.py`); empty when it has none.
fn python_mlx(python: &str) -> Vec<PathBuf> {
    let Ok(out) =
        Command::new(python).args(["-c", "import mlx, sys; sys.stdout.write(chr(10).join(mlx.__path__))"]).output()
    else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect()
}
