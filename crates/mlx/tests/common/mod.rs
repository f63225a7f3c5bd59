// SPDX-License-Identifier: EUPL-1.2
//! Helpers shared by the integration tests: tolerant comparisons against
//! float64 references, error checks, deterministic data and CPU-side
//! reference implementations of shape algebra; `ranks` starts multi-process
//! jobs of the test binary itself.

#![allow(dead_code)]

pub(crate) mod ranks;

use mlx::{Array, Error, Result};

/// Asserts `actual[i] ≈ expected[i]` for every `i`, with `|a - e| <= tol * max(1, |e|)`
/// (absolute near zero, relative elsewhere), and reports the first mismatch.
#[track_caller]
pub(crate) fn assert_close(actual: &[f32], expected: &[f64], tol: f64) {
    let actual: Vec<f64> = actual.iter().map(|&a| f64::from(a)).collect();
    assert_close64(&actual, expected, tol);
}

/// [`assert_close`] for `f64` results (the comparison both use).
#[track_caller]
pub(crate) fn assert_close64(actual: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "length differs: got {} values, expected {}",
        actual.len(),
        expected.len()
    );
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let ok = if e.is_nan() {
            a.is_nan()
        } else if e.is_infinite() {
            a == e
        } else {
            (a - e).abs() <= tol * e.abs().max(1.0)
        };
        assert!(
            ok,
            "first mismatch at index {i}: got {a}, expected {e} (tolerance {tol})\nactual:   {actual:?}\nexpected: {expected:?}"
        );
    }
}

/// Reads an array as `f32` values (converting when needed).
#[track_caller]
pub(crate) fn vals(a: &Array) -> Vec<f32> {
    a.to_vec_f32().expect("reading the array as f32")
}

/// Reads an `int32` array.
#[track_caller]
pub(crate) fn ints(a: &Array) -> Vec<i32> {
    a.to_vec::<i32>().expect("reading the array as i32")
}

/// Reads an array of any integer dtype as `i64` values.
#[track_caller]
pub(crate) fn ints64(a: &Array) -> Vec<i64> {
    mlx::ops::astype(a, mlx::Dtype::Int64).and_then(|x| x.to_vec::<i64>()).expect("reading the array as i64")
}

/// An `f32` array of `shape` holding `data`.
#[track_caller]
pub(crate) fn arr(data: &[f32], shape: &[i32]) -> Array {
    Array::from_slice(data, shape).expect("building an f32 array")
}

/// An `i32` array of `shape` holding `data`.
#[track_caller]
pub(crate) fn iarr(data: &[i32], shape: &[i32]) -> Array {
    Array::from_slice(data, shape).expect("building an i32 array")
}

/// An `f32` array `0, 1, 2, ...` of `shape`.
pub(crate) fn iota(shape: &[i32]) -> Array {
    let n: i32 = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
    arr(&data, shape)
}

/// Deterministic pseudo-random values in `[-1, 1)` (a 64-bit LCG), the same
/// on every run.
pub(crate) fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// `f32` values widened to `f64`.
pub(crate) fn wide(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| f64::from(x)).collect()
}

/// A table of functions from `mlx::ops`, each cast to the function-pointer
/// type `$ty` and paired with its name (the op its errors must name):
/// `named_ops!(Binary; add, less)` is
/// `[(ops::add as Binary, "add"), (ops::less as Binary, "less")]`.
#[allow(unused_macros)]
macro_rules! named_ops {
    ($ty:ty; $($op:ident),+ $(,)?) => {
        [$((mlx::ops::$op as $ty, stringify!($op))),+]
    };
}

/// Asserts that `r` failed with an error naming `op` and carrying a
/// non-empty message, and returns the error.
#[track_caller]
pub(crate) fn expect_err<T: std::fmt::Debug>(r: Result<T>, op: &str) -> Error {
    let e = r.expect_err("expected an error");
    assert_eq!(e.op(), op, "wrong op in error: {e}");
    let text = e.to_string();
    assert!(text.len() > op.len() + 2, "error message is empty: {text:?}");
    e
}

/// Row-major strides of `shape`.
pub(crate) fn row_strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * shape[i + 1];
    }
    st
}

/// The multi-index of flat position `flat` in `shape`.
pub(crate) fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0usize; shape.len()];
    for i in (0..shape.len()).rev() {
        if shape[i] > 0 {
            idx[i] = flat % shape[i];
            flat /= shape[i];
        }
    }
    idx
}

/// CPU reference of `transpose(x, perm)` on row-major `data` of `shape`.
pub(crate) fn permute_ref<T: Copy>(data: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let st = row_strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let n: usize = out_shape.iter().product();
    (0..n)
        .map(|flat| {
            let idx = unravel(flat, &out_shape);
            let src: usize = idx.iter().zip(perm).map(|(&i, &p)| i * st[p]).sum();
            data[src]
        })
        .collect()
}

/// CPU reference of `broadcast_to(x, out_shape)` (NumPy rules, right-aligned).
pub(crate) fn broadcast_ref<T: Copy>(data: &[T], shape: &[usize], out_shape: &[usize]) -> Vec<T> {
    let st = row_strides(shape);
    let lead = out_shape.len() - shape.len();
    let n: usize = out_shape.iter().product();
    (0..n)
        .map(|flat| {
            let idx = unravel(flat, out_shape);
            let src: usize = (0..shape.len()).map(|d| if shape[d] == 1 { 0 } else { idx[lead + d] * st[d] }).sum();
            data[src]
        })
        .collect()
}

/// Naive `[m, k] @ [k, n]` in f64.
pub(crate) fn matmul_ref(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    out
}

/// Softmax of each row of length `n`, in f64.
pub(crate) fn softmax_ref(x: &[f64], n: usize) -> Vec<f64> {
    x.chunks(n)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / s)
        })
        .collect()
}

/// A tiny fixture model directory (`testdata/models/<name>`).
pub(crate) fn tiny_model(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models").join(name)
}

/// A scratch copy of a tiny fixture model, to break on purpose.
pub(crate) fn copy_tiny_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for e in std::fs::read_dir(tiny_model(name)).expect("the fixture directory") {
        let e = e.expect("a directory entry");
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copying a fixture file");
    }
    dir
}

/// A scratch copy of a tiny fixture model whose weights (`model.safetensors`, its metadata kept)
/// `edit` has changed.
pub(crate) fn copy_tiny_model_with(
    name: &str,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, Array>),
) -> tempfile::TempDir {
    let dir = copy_tiny_model(name);
    let path = dir.path().join("model.safetensors");
    let mut weights = mlx::io::load_safetensors(&path).expect("the fixture's weights");
    edit(&mut weights.tensors);
    let tensors = weights.tensors.iter().map(|(k, v)| (k.as_str(), v));
    mlx::io::save_safetensors(&path, tensors, &weights.metadata).expect("saving the edited weights");
    dir
}

/// Whether ops on this thread run on a GPU (Metal or CUDA).
pub(crate) fn on_gpu() -> bool {
    matches!(mlx::device::current(), Ok(mlx::Device::Gpu))
}

/// A matmul tolerance: `cpu` on the CPU; on a GPU at least 1e-2, because
/// float32 matmuls there may run on TF32 tensor cores (10-bit mantissa), and
/// long sums of such products drift by a few 1e-3.
pub(crate) fn matmul_tol(cpu: f64) -> f64 {
    if on_gpu() { cpu.max(1e-2) } else { cpu }
}

/// MLX's GPU backends have no float64: tests of float64 run on the CPU.
pub(crate) fn cpu_for_float64() -> mlx::device::DeviceScope {
    mlx::device::DeviceScope::new(mlx::Device::Cpu).expect("the CPU is always available")
}

/// Waits for queued device work, so process-wide memory figures are settled
/// (GPU backends free buffers when the stream has finished with them).
pub(crate) fn settle() {
    mlx::device::synchronize(None).expect("synchronize");
}

/// A real model from the models cache (`cargo xtask fixtures`); `None` with a
/// note when it is absent, a panic when `MLXR_REQUIRE_REAL_MODELS=1`.
#[allow(dead_code)]
pub(crate) fn real_model(name: &str) -> Option<std::path::PathBuf> {
    let dir = parity::models_dir().map(|d| d.join(name));
    match dir {
        Some(d) if d.join("config.json").is_file() => Some(d),
        _ if parity::real_models_required() => {
            panic!("real model {name} is missing and MLXR_REQUIRE_REAL_MODELS is set; run `cargo xtask fixtures`")
        }
        _ => {
            eprintln!("note: real model {name} is absent (run `cargo xtask fixtures`); skipped");
            None
        }
    }
}
