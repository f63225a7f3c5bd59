// SPDX-License-Identifier: EUPL-1.2
//! Our CUDA kernels (`csrc/mlxs_kernels.cpp`, `csrc/mlxs_norm_kernel.cpp`, `csrc/mlxs_attn_kernel.cpp`, `csrc/mlxs_rope_kernel.cpp`) compile: `nvrtc_check.py`
//! compiles every kernel source and every instantiation the dispatch code makes with NVRTC, as MLX
//! does at a kernel's first call on a GPU machine, for compute capability 8.0 and 9.0 — here,
//! without a GPU. NVRTC comes from
//! the fixtures' virtualenv (`xtask/fixtures/requirements.txt`, Linux x86_64); `cargo xtask test`
//! points `MLXR_PYTHON` at it. Without it the test says so and passes, unless
//! `MLXR_REQUIRE_REAL_MODELS=1` (set by `cargo xtask test`) on Linux x86_64, where it fails.

mod common;

use std::path::Path;
use std::process::Command;

/// NVRTC's packages are pinned for Linux x86_64 only.
fn skip_or_fail(why: &str) {
    let here = cfg!(all(target_os = "linux", target_arch = "x86_64"));
    common::skip_or_fail("the CUDA kernels' compile check", why, here);
}

#[test]
fn cuda_kernels_compile_with_nvrtc() {
    let python = match common::fixtures_python() {
        Ok(python) => python,
        Err(why) => return skip_or_fail(&why),
    };
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&python)
        .arg(here.join("tests").join("nvrtc_check.py"))
        .arg(here.join("csrc").join("mlxs_kernels.cpp"))
        .arg(here.join("csrc").join("mlxs_norm_kernel.cpp"))
        .arg(here.join("csrc").join("mlxs_attn_kernel.cpp"))
        .arg(here.join("csrc").join("mlxs_rope_kernel.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", python.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match out.status.code() {
        Some(0) => {
            assert!(text.contains("compute_90: "), "{text}");
            eprint!("{text}");
        }
        Some(3) => skip_or_fail(text.trim()),
        _ => panic!("a CUDA kernel does not compile:\n{text}"),
    }
}

/// On a GPU our kernels are compiled by our own path (`csrc/mlxs_kernel_cache.cpp`: NVRTC, the
/// CUDA headers, a cubin kept on disk) instead of MLX's `cuda_kernel`, unless
/// `MLXR_KERNEL_CACHE=0`. Here, without a GPU: every instantiation `nvrtc_check.py` compiles goes through
/// that path for compute capability 8.0 and 9.0 (NVRTC and the headers from the fixtures'
/// virtualenv); a second compiler reads every cubin back from the cache directory; a file cut
/// short is compiled again, not used.
#[test]
fn our_compile_path_makes_and_caches_every_kernel() {
    let python = match common::fixtures_python() {
        Ok(python) => python,
        Err(why) => return skip_or_fail(&why),
    };
    let find = "import nvidia.cuda_nvrtc as n, nvidia.cuda_runtime as r, pathlib\n\
                lib = [p for p in sorted((pathlib.Path(list(n.__path__)[0]) / 'lib').glob('libnvrtc.so*')) \
                if 'builtins' not in p.name and '.alt.' not in p.name]\n\
                print(lib[0]); print(pathlib.Path(list(r.__path__)[0]) / 'include')";
    let out = Command::new(&python).args(["-c", find]).output().expect("the fixtures' Python runs");
    if !out.status.success() {
        return skip_or_fail(&format!("NVRTC is not installed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let text = String::from_utf8(out.stdout).expect("paths are UTF-8");
    let mut lines = text.lines();
    let (nvrtc, include) = (lines.next().expect("NVRTC's path"), lines.next().expect("the headers' path"));
    let cache = std::env::temp_dir().join(format!("mlxr-kernel-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in a path");
    let (nvrtc, include, dir) = (c(nvrtc), c(include), c(cache.to_str().expect("a UTF-8 temp dir")));
    let check = |arch: i32| -> [i32; 3] {
        let mut counts = [0i32; 3];
        let [made, first, second] = &mut counts;
        // SAFETY: the strings outlive the call; the outputs are valid ints.
        let status = unsafe {
            mlx_sys::mlxs_kernel_cache_check(nvrtc.as_ptr(), include.as_ptr(), arch, dir.as_ptr(), made, first, second)
        };
        if status != 0 {
            // SAFETY: the message is a NUL-terminated string owned by the shim's thread.
            let why = unsafe { std::ffi::CStr::from_ptr(mlx_sys::mlxs_last_error()) };
            panic!("compute capability {arch}: {}", why.to_string_lossy());
        }
        counts
    };
    let cubins = || {
        let mut files: Vec<_> =
            std::fs::read_dir(&cache).expect("the cache exists").map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    };
    for arch in [80, 90] {
        // 8 one-row, 12 multi-row, 8 fused-norm, 10 decode-attention, 8 few-query attention, 8 q/k rope
        // and 10 norm-and-product instantiations, none on disk at first.
        assert_eq!(check(arch), [64, 0, 64], "compute capability {arch}");
    }
    let files = cubins();
    assert_eq!(files.len(), 128, "one cubin per instantiation and architecture");
    let cut = &files[0];
    let bytes = std::fs::read(cut).expect("a cubin reads");
    std::fs::write(cut, &bytes[..bytes.len() - 1]).expect("the cubin is cut short");
    // Its key names the architecture it was made for.
    let needle = b"--gpu-architecture=sm_80";
    let arch = if bytes.windows(needle.len()).any(|w| w == needle) { 80 } else { 90 };
    assert_eq!(check(arch), [64, 63, 64], "the file cut short is compiled again");
    assert_eq!(std::fs::read(cut).expect("the cubin reads again"), bytes, "and written whole");
    let _ = std::fs::remove_dir_all(&cache);
}

/// Stages `cubin` for a kernel `name` in `dir` (`csrc/mlxs_kernel_cache.cpp`, `stage_for_mlx`)
/// and returns the staged code's path, empty when nothing was staged.
fn stage(dir: &std::path::Path, name: &str, cubin: &[u8]) -> String {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (dir, name) = (c(dir.to_str().expect("a UTF-8 path")), c(name));
    let mut path = vec![0u8; 4096];
    // SAFETY: the strings and the buffer outlive the call; `cubin` is `len` bytes.
    let status = unsafe {
        mlx_sys::mlxs_kernel_stage_check(
            dir.as_ptr(),
            name.as_ptr(),
            cubin.as_ptr().cast(),
            cubin.len(),
            path.as_mut_ptr().cast(),
            path.len(),
        )
    };
    assert_eq!(status, 0, "staging runs");
    let end = path.iter().position(|&b| b == 0).expect("a NUL-terminated path");
    String::from_utf8(path[..end].to_vec()).expect("a UTF-8 path")
}

/// MLX hashes a precompiled kernel's whole source (our cubin) every time it runs it; our kernel
/// cache hands it a short handle instead, having staged the cubin where MLX's module loader reads
/// modules from, under the name MLX derives from that handle: `<name>_<hex>.ptx` holding the
/// cubin and `<name>_<hex>.txt` naming the entry point. Here: the files are written whole, the
/// name is the same each time for the same cubin and another for another, a stale file is
/// replaced, and a directory that is not one stages nothing (the kernel then keeps its cubin).
#[test]
fn cubins_are_staged_where_mlx_reads_modules_from() {
    let dir = std::env::temp_dir().join(format!("mlxr-stage-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let name = "mlxr_qmv4_bf16_K4096_GROUP64";
    let cubin: Vec<u8> = (0..25_691u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let path = stage(&dir, name, &cubin);
    let file = std::path::Path::new(&path);
    assert_eq!(file.parent(), Some(dir.as_path()));
    let stem = file.file_stem().and_then(|s| s.to_str()).expect("a file name");
    let hex = stem.strip_prefix(&format!("{name}_")).expect("the kernel's name, then the handle's hash");
    assert!(!hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{stem}");
    assert_eq!(file.extension().and_then(|e| e.to_str()), Some("ptx"));
    assert_eq!(std::fs::read(file).expect("the code reads"), cubin);
    let txt = file.with_extension("txt");
    assert_eq!(std::fs::read_to_string(&txt).expect("the entry point reads"), format!("{name}\t{name}\n"));
    assert_eq!(stage(&dir, name, &cubin), path, "the same cubin, the same module");
    let mut other = cubin.clone();
    other[100] ^= 1;
    let other_path = stage(&dir, name, &other);
    assert!(!other_path.is_empty() && other_path != path, "another cubin, another module");
    // A file cut short is written again.
    std::fs::write(file, &cubin[..1000]).expect("cut short");
    assert_eq!(stage(&dir, name, &cubin), path);
    assert_eq!(std::fs::read(file).expect("the code reads"), cubin);
    let files = std::fs::read_dir(&dir).expect("the dir lists").count();
    assert_eq!(files, 4, "two modules, two files each, nothing left over");
    // Not a directory, or no code: nothing staged.
    assert_eq!(stage(file, name, &cubin), "");
    assert_eq!(stage(&dir, name, &[]), "");
    let _ = std::fs::remove_dir_all(&dir);
}
