// SPDX-License-Identifier: EUPL-1.2
//! `widen_matmul`: float32 rows times a 16-bit matrix, computed in float32
//! by our CPU kernel where it applies (checked with `widen_matmul_applies`)
//! and by MLX's matmul elsewhere, against a float64 reference of the widened
//! values; and its errors.

mod common;

use common::{arr, assert_close, data, expect_err, matmul_ref, on_gpu, vals, wide};
use mlx::ops;
use mlx::{Array, Dtype};

/// A `[n, k]` matrix of `dtype` and its values widened to f64 (exact: every
/// 16-bit value is a float32).
fn matrix(n: usize, k: usize, dtype: Dtype, seed: u64) -> (Array, Vec<f64>) {
    let w = ops::astype(&arr(&data(n * k, seed), &[n as i32, k as i32]), dtype).unwrap();
    let back = wide(&vals(&ops::astype(&w, Dtype::Float32).unwrap()));
    (w, back)
}

/// `x [m, k] @ w [n, k]ᵀ` in f64.
fn reference(x: &[f32], m: usize, w: &[f64], n: usize, k: usize) -> Vec<f64> {
    let mut wt = vec![0.0; k * n];
    for r in 0..n {
        for c in 0..k {
            wt[c * n + r] = w[r * k + c];
        }
    }
    matmul_ref(&wide(x), &wt, m, k, n)
}

#[test]
fn matches_the_widened_matmul_for_16_bit_matrices_and_any_row_count() {
    check_shapes();
}

#[test]
fn the_portable_loops_match_too() {
    // Other tests of this binary may run meanwhile; their results hold on
    // either path.
    ops::set_widen_simd(false).unwrap();
    check_shapes();
    check_quantised_shapes();
    ops::set_widen_simd(true).unwrap();
}

#[test]
fn quantised_matrices_match_their_float32_dequantisation() {
    check_quantised_shapes();
}

/// 4 and 8 bits, groups of 32, 64 and 128, scales in three types, 1 to 33 rows.
fn check_quantised_shapes() {
    for &(bits, gs) in &[(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)] {
        for &(m, k, n, scales) in &[
            (1, 128, 8, Dtype::Float32),
            (3, 256, 4099, Dtype::Bfloat16),
            (32, 384, 40, Dtype::Float16),
            (33, 128, 24, Dtype::Bfloat16),
        ] {
            let w = arr(&data(n * k, 40 + bits as u64), &[n as i32, k as i32]);
            let mut q = ops::quantize(&w, gs, bits).unwrap();
            q.scales = ops::astype(&q.scales, scales).unwrap();
            q.biases = q.biases.map(|b| ops::astype(&b, scales).unwrap());
            // The float32 dequantisation of the scales' values.
            let q32 = mlx::ops::Quantized {
                scales: ops::astype(&q.scales, Dtype::Float32).unwrap(),
                biases: q.biases.as_ref().map(|b| ops::astype(b, Dtype::Float32).unwrap()),
                ..q.clone()
            };
            let dense = wide(&vals(&ops::dequantize(&q32, Some(Dtype::Float32)).unwrap()));
            let xv = data(m * k, 50 + gs as u64);
            let x = arr(&xv, &[m as i32, k as i32]);
            let what = format!("bits {bits} gs {gs} m={m} k={k} n={n} {scales}");
            assert_eq!(ops::widen_quantized_matmul_applies(&x, &q).unwrap(), !on_gpu() && m <= 32, "{what}");
            let y = ops::widen_quantized_matmul(&x, &q).unwrap();
            assert_eq!((y.dtype(), y.shape()), (Dtype::Float32, vec![m as i32, n as i32]), "{what}");
            let tol = if on_gpu() { 1e-2 } else { 1e-4 };
            let got = vals(&y);
            let want = reference(&xv, m, &dense, n, k);
            let scale = want.iter().fold(1.0f64, |a, v| a.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(g, w)| (f64::from(*g) - w).abs()).fold(0.0, f64::max);
            assert!(worst <= tol * scale, "{what}: off by {worst} (largest {scale})");
        }
    }
}

#[test]
fn quantised_inputs_it_cannot_take_are_dequantised_or_refused() {
    let w = arr(&data(16 * 64, 3), &[16, 64]);
    let q = ops::quantize(&w, 64, 4).unwrap();
    // bfloat16 rows, or 3 bits: the dequantised matmul.
    let x = arr(&data(64, 4), &[1, 64]);
    let xb = ops::astype(&x, Dtype::Bfloat16).unwrap();
    assert!(!ops::widen_quantized_matmul_applies(&xb, &q).unwrap());
    let q3 = ops::quantize(&w, 64, 3).unwrap();
    assert!(!ops::widen_quantized_matmul_applies(&x, &q3).unwrap());
    let dense = ops::dequantize(&q3, Some(Dtype::Float32)).unwrap();
    let want = ops::matmul(&x, &ops::transpose(&dense, &[1, 0]).unwrap()).unwrap();
    assert_eq!(vals(&ops::widen_quantized_matmul(&x, &q3).unwrap()), vals(&want));
    // Shapes that do not fit, and a group size MLX does not have.
    let x_bad = arr(&data(32, 4), &[1, 32]);
    expect_err(ops::widen_quantized_matmul(&x_bad, &q).and_then(|y| y.eval().map(|_| y)), "widen_quantized_matmul");
    let odd = mlx::ops::Quantized { group_size: 48, ..q.clone() };
    let e = expect_err(ops::widen_quantized_matmul(&x, &odd), "widen_quantized_matmul");
    assert!(e.to_string().contains("48"), "{e}");
}

fn check_shapes() {
    // Shapes: K a multiple of 16 and not (the kernel's tail), W big enough to
    // split over threads (2^18 of its values a share at least) and not, 1 to 33 rows
    // (33 is past the kernel's limit: MLX's matmul).
    for dtype in [Dtype::Bfloat16, Dtype::Float16] {
        for &(m, k, n) in &[(1, 64, 8), (1, 70, 4099), (3, 640, 5000), (32, 33, 300), (33, 48, 40)] {
            let (w, wv) = matrix(n, k, dtype, 7 + m as u64);
            let xv = data(m * k, 11 + k as u64);
            let x = arr(&xv, &[m as i32, k as i32]);
            let kernel = ops::widen_matmul_applies(&x, &w).unwrap();
            assert_eq!(kernel, !on_gpu() && m <= 32, "{dtype} m={m} k={k} n={n}: kernel applies");
            let y = ops::widen_matmul(&x, &w).unwrap();
            assert_eq!(y.dtype(), Dtype::Float32);
            assert_eq!(y.shape(), vec![m as i32, n as i32]);
            let tol = if on_gpu() { 1e-2 } else { 1e-5 };
            assert_close(&vals(&y), &reference(&xv, m, &wv, n, k), tol);
        }
    }
}

#[test]
fn keeps_leading_axes_and_reads_views_of_any_layout() {
    let (k, n) = (40, 24);
    let (w_big, wv_big) = matrix(n, 2 * k, Dtype::Bfloat16, 3);
    // Every other column of a wider matrix: not row-contiguous.
    let w = ops::slice(&w_big, &[0, 0], &[n as i32, 2 * k as i32]).unwrap();
    let w = ops::reshape(&w, &[n as i32, k as i32, 2]).unwrap();
    let w = ops::take(&w, &Array::from_slice(&[0i32], &[]).unwrap(), 2).unwrap();
    let wv: Vec<f64> =
        (0..n).flat_map(|r| (0..k).map(move |c| (r, c))).map(|(r, c)| wv_big[r * 2 * k + 2 * c]).collect();
    // A transposed x of shape [2, 3, k].
    let xv = data(2 * 3 * k, 5);
    let xt = arr(&xv, &[k as i32, 3, 2]);
    let x = ops::transpose(&xt, &[2, 1, 0]).unwrap();
    let x_rows: Vec<f32> = vals(&x);
    let y = ops::widen_matmul(&x, &w).unwrap();
    assert_eq!(y.shape(), vec![2, 3, n as i32]);
    assert_close(&vals(&y), &reference(&x_rows, 6, &wv, n, k), if on_gpu() { 1e-2 } else { 1e-5 });
    // The quantised product reads the same transposed x (and a broadcast one) where it lies.
    let q = ops::quantize(&arr(&data(n * 64, 6), &[n as i32, 64]), 32, 4).unwrap();
    let dense = wide(&vals(&ops::dequantize(&q, Some(Dtype::Float32)).unwrap()));
    let xq = ops::transpose(&arr(&data(2 * 3 * 64, 7), &[64, 3, 2]), &[2, 1, 0]).unwrap();
    let xb = ops::broadcast_to(&arr(&data(64, 8), &[1, 64]), &[3, 64]).unwrap();
    for (x, rows) in [(&xq, 6), (&xb, 3)] {
        assert!(ops::widen_quantized_matmul_applies(x, &q).unwrap() || on_gpu());
        let y = ops::widen_quantized_matmul(x, &q).unwrap();
        assert_close(&vals(&y), &reference(&vals(x), rows, &dense, n, 64), if on_gpu() { 1e-2 } else { 1e-4 });
    }
}

#[test]
fn other_types_are_matmul_with_its_promotion() {
    let (k, n) = (32, 16);
    let xv = data(2 * k, 9);
    let x = arr(&xv, &[2, k as i32]);
    // bfloat16 rows: MLX's matmul in bfloat16, not our kernel.
    let (w, _) = matrix(n, k, Dtype::Bfloat16, 4);
    let xb = ops::astype(&x, Dtype::Bfloat16).unwrap();
    assert!(!ops::widen_matmul_applies(&xb, &w).unwrap());
    let got = ops::widen_matmul(&xb, &w).unwrap();
    let want = ops::matmul(&xb, &ops::transpose(&w, &[1, 0]).unwrap()).unwrap();
    assert_eq!(got.dtype(), Dtype::Bfloat16);
    assert_eq!(vals(&ops::astype(&got, Dtype::Float32).unwrap()), vals(&ops::astype(&want, Dtype::Float32).unwrap()));
    // A float32 matrix: plain matmul.
    let wf = arr(&data(n * k, 4), &[n as i32, k as i32]);
    assert!(!ops::widen_matmul_applies(&x, &wf).unwrap());
    let got = ops::widen_matmul(&x, &wf).unwrap();
    let want = ops::matmul(&x, &ops::transpose(&wf, &[1, 0]).unwrap()).unwrap();
    assert_eq!(vals(&got), vals(&want));
    // No rows at all.
    let empty = arr(&[], &[0, k as i32]);
    assert!(!ops::widen_matmul_applies(&empty, &w).unwrap());
    assert_eq!(ops::widen_matmul(&empty, &w).unwrap().shape(), vec![0, n as i32]);
}

#[test]
fn shapes_that_do_not_fit_are_errors_that_name_the_op() {
    let (w, _) = matrix(8, 16, Dtype::Bfloat16, 1);
    let x = arr(&data(2 * 15, 2), &[2, 15]);
    let e = expect_err(ops::widen_matmul(&x, &w).and_then(|y| y.eval().map(|_| y)), "widen_matmul");
    assert!(e.to_string().contains("15") || e.to_string().contains("shape"), "{e}");
    let w3 = ops::reshape(&w, &[2, 4, 16]).unwrap();
    let e = expect_err(ops::widen_matmul(&arr(&data(16, 2), &[1, 16]), &w3), "widen_matmul");
    assert!(e.to_string().contains("2-D"), "{e}");
}

#[test]
fn chains_lazily_with_other_ops() {
    // Several products queued before one eval, one feeding the next.
    let (w1, w1v) = matrix(48, 32, Dtype::Bfloat16, 21);
    let (w2, w2v) = matrix(32, 48, Dtype::Float16, 22);
    let xv = data(32, 23);
    let h = ops::widen_matmul(&arr(&xv, &[1, 32]), &w1).unwrap();
    let y = ops::widen_matmul(&h, &w2).unwrap();
    let h_ref = reference(&xv, 1, &w1v, 48, 32);
    let h32: Vec<f32> = h_ref.iter().map(|&v| v as f32).collect();
    assert_close(&vals(&y), &reference(&h32, 1, &w2v, 32, 48), if on_gpu() { 1e-2 } else { 1e-4 });
}

#[test]
fn its_derivative_is_the_matmuls() {
    use mlx::transforms::{Closure, vjp};
    let (m, k, n) = (2, 24, 10);
    let (w, wv) = matrix(n, k, Dtype::Bfloat16, 31);
    let xv = data(m * k, 32);
    let x = arr(&xv, &[m as i32, k as i32]);
    let cv = data(m * n, 33);
    let cot = arr(&cv, &[m as i32, n as i32]);
    let w_in = w.clone();
    let f = Closure::new(move |inputs: &[Array]| Ok(vec![ops::widen_matmul(&inputs[0], &w_in)?])).unwrap();
    let (_, grads) = vjp(&f, &[&x], &[&cot]).unwrap();
    // d/dx (x Wᵀ) · cot = cot W.
    let want = matmul_ref(&wide(&cv), &wv, m, n, k);
    assert_close(&vals(&grads[0]), &want, if on_gpu() { 1e-2 } else { 1e-5 });
}

/// A product big enough to be split over threads (the helpers of `split_rows`) equals, bit for
/// bit, the same rows computed a small part at a time (each part too small to split): every row
/// is computed by one thread the same way whatever the split. 16-bit and 4-bit matrices.
#[test]
fn a_split_product_equals_its_rows_one_part_at_a_time() {
    if on_gpu() {
        return;
    }
    let (m, k, n, part) = (2, 640, 4096, 128);
    let x = arr(&data(m * k, 91), &[m as i32, k as i32]);
    let (w, _) = matrix(n, k, Dtype::Bfloat16, 92);
    let q = ops::quantize(&ops::astype(&w, Dtype::Float32).unwrap(), 64, 4).unwrap();
    let rows = |a: &Array, r: usize| ops::slice_axis(a, 0, r as i32, (r + part) as i32).unwrap();
    let parts = |f: &dyn Fn(usize) -> Array| {
        let pieces: Vec<Array> = (0..n).step_by(part).map(f).collect();
        vals(&ops::concatenate(&pieces.iter().collect::<Vec<_>>(), 1).unwrap())
    };
    let whole = vals(&ops::widen_matmul(&x, &w).unwrap());
    assert_eq!(whole, parts(&|r| ops::widen_matmul(&x, &rows(&w, r)).unwrap()), "16-bit");
    let whole = vals(&ops::widen_quantized_matmul(&x, &q).unwrap());
    let part_of = |r: usize| mlx::ops::Quantized {
        weight: rows(&q.weight, r),
        scales: rows(&q.scales, r),
        biases: q.biases.as_ref().map(|b| rows(b, r)),
        ..q.clone()
    };
    assert_eq!(whole, parts(&|r| ops::widen_quantized_matmul(&x, &part_of(r)).unwrap()), "4-bit");
}
