// SPDX-License-Identifier: EUPL-1.2
//! Our CUDA kernels (`csrc/mlxs_kernels.cpp`) compile: `nvrtc_check.py` compiles every kernel source
//! and every instantiation the dispatch code makes with NVRTC, as MLX does at a kernel's first call
//! on a GPU machine, for compute capability 8.0 and 9.0 — here, without a GPU. NVRTC comes from
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
