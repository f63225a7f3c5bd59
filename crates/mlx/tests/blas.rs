// SPDX-License-Identifier: EUPL-1.2
//! The optimised BLAS that `cargo xtask setup` fetched is the one MLX's CPU
//! matmuls call: the build links it ahead of the reference BLAS the Linux
//! wheel's `libmlx.so` carries (`mlx_build::blas`). Nothing is timed here: the
//! test checks where `cblas_sgemm` resolves after a real float32 matmul, and
//! that the matmul is right.

use std::path::Path;

use mlx::device::with_device;
use mlx::{Array, Device, ops};

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[test]
fn float32_matmuls_run_on_the_linked_blas() {
    // A real matmul on the CPU first: 64 × 96 by 96 × 32, checked against f64.
    let (m, k, n) = (64usize, 96usize, 32usize);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 23) as f32 - 11.0) / 8.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 19) as f32 - 9.0) / 8.0).collect();
    let c = with_device(Device::Cpu, || {
        let x = Array::from_slice(&a, &[m as i32, k as i32])?;
        let y = Array::from_slice(&b, &[k as i32, n as i32])?;
        ops::matmul(&x, &y)?.to_vec::<f32>()
    })
    .unwrap()
    .unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k).map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j])).sum();
            assert!((f64::from(c[i * n + j]) - want).abs() < 1e-3, "c[{i},{j}] = {} != {want}", c[i * n + j]);
        }
    }

    let info = mlx::blas::info();
    let Some(linked) = mlx::blas::linked() else {
        eprintln!(
            "skipped: this build linked no optimised BLAS (not Linux, `cargo xtask setup` could not get one, or \
             MLXR_BLAS_DIR=none); cblas_sgemm resolves to {}",
            info.describe()
        );
        return;
    };
    let library = info.library.as_deref().expect("cblas_sgemm resolves in a process that links libmlx");
    assert!(
        same_file(library, linked),
        "cblas_sgemm resolves to {} but the build linked {} ahead of libmlx's BLAS",
        library.display(),
        linked.display()
    );
    assert!(!info.is_reference(), "{}", info.describe());
    let openblas = info.openblas.as_ref().expect("the linked BLAS is OpenBLAS and reports itself");
    assert!(openblas.config.contains("OpenBLAS"), "{}", openblas.config);
    assert!(openblas.threads >= 1);
    // The library is mapped into this process (the loader really loaded it).
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        let name = linked.file_name().and_then(|n| n.to_str()).unwrap_or("libopenblas");
        assert!(maps.contains(name), "{name} is not mapped into this process");
    }
}
