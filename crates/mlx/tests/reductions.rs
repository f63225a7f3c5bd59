// SPDX-License-Identifier: EUPL-1.2
//! Reductions, softmax, logsumexp, argmax/argmin, scans, sorting, top-k and
//! partitions, against float64 references; out-of-range axes and empty input.

#[macro_use]
mod common;

use common::{arr, assert_close, data, expect_err, iarr, ints, iota, softmax_ref, vals, wide};
use half::bf16;
use mlx::{Array, Dtype, ops};

const ROWS: usize = 3;
const COLS: usize = 5;

fn matrix() -> (Vec<f32>, Array) {
    let d = data(ROWS * COLS, 7);
    let a = arr(&d, &[ROWS as i32, COLS as i32]);
    (d, a)
}

/// Reduces a row-major [ROWS, COLS] matrix along `axis` with `f` in f64.
fn reduce_ref(d: &[f32], axis: usize, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let d = wide(d);
    if axis == 1 {
        d.chunks(COLS).map(&f).collect()
    } else {
        (0..COLS).map(|c| f(&(0..ROWS).map(|r| d[r * COLS + c]).collect::<Vec<_>>())).collect()
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn var(x: &[f64]) -> f64 {
    let m = mean(x);
    x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / x.len() as f64
}

fn lse(x: &[f64]) -> f64 {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

type Reduction = fn(&Array, &[i32], bool) -> mlx::Result<Array>;
type Reference = fn(&[f64]) -> f64;

#[test]
fn reductions_match_f64_along_each_axis() {
    let (d, a) = matrix();
    let cases: [(Reduction, Reference); 8] = [
        (ops::sum, |x| x.iter().sum()),
        (ops::mean, mean),
        (ops::max, |x| x.iter().cloned().fold(f64::NEG_INFINITY, f64::max)),
        (ops::min, |x| x.iter().cloned().fold(f64::INFINITY, f64::min)),
        (ops::prod, |x| x.iter().product()),
        (ops::logsumexp, lse),
        (ops::var, var),
        (ops::std, |x| var(x).sqrt()),
    ];
    for (i, (f, r)) in cases.iter().enumerate() {
        for axis in [0usize, 1] {
            let out = f(&a, &[axis as i32], false).unwrap();
            let want_len = if axis == 0 { COLS } else { ROWS };
            assert_eq!(out.shape(), vec![want_len as i32], "case {i} axis {axis}");
            assert_close(&vals(&out), &reduce_ref(&d, axis, r), 1e-5);
            // Negative axes and keepdims.
            let neg = f(&a, &[axis as i32 - 2], true).unwrap();
            let kept = if axis == 0 { vec![1, COLS as i32] } else { vec![ROWS as i32, 1] };
            assert_eq!(neg.shape(), kept);
            assert_close(&vals(&neg), &reduce_ref(&d, axis, r), 1e-5);
        }
    }
}

#[test]
fn reductions_over_all_axes() {
    let (d, a) = matrix();
    let w = wide(&d);
    let s = ops::sum_all(&a, false).unwrap();
    assert_eq!(s.ndim(), 0);
    assert_close(&vals(&s), &[w.iter().sum()], 1e-5);
    assert_eq!(ops::sum_all(&a, true).unwrap().shape(), vec![1, 1]);
    assert_close(&vals(&ops::mean_all(&a, false).unwrap()), &[mean(&w)], 1e-5);
    assert_close(&vals(&ops::var_all(&a, false).unwrap()), &[var(&w)], 1e-5);
    assert_close(&vals(&ops::std_all(&a, false).unwrap()), &[var(&w).sqrt()], 1e-5);
    assert_close(&vals(&ops::logsumexp_all(&a, false).unwrap()), &[lse(&w)], 1e-5);
    assert_close(&vals(&ops::max_all(&a, false).unwrap()), &[w.iter().cloned().fold(f64::MIN, f64::max)], 0.0);
    assert_close(&vals(&ops::min_all(&a, false).unwrap()), &[w.iter().cloned().fold(f64::MAX, f64::min)], 0.0);
    assert_close(&vals(&ops::prod_all(&a, false).unwrap()), &[w.iter().product()], 1e-5);
    // Several axes at once equals all of them.
    assert_close(&vals(&ops::sum(&a, &[0, 1], false).unwrap()), &[w.iter().sum()], 1e-5);
    // An empty axis list reduces nothing.
    assert_eq!(vals(&ops::sum(&a, &[], false).unwrap()), d);
}

#[test]
fn boolean_reductions() {
    let b = Array::from_slice(&[true, false, true, true, true, true], &[2, 3]).unwrap();
    assert_eq!(ops::all(&b, &[1], false).unwrap().to_vec::<bool>().unwrap(), vec![false, true]);
    assert_eq!(ops::any(&b, &[0], false).unwrap().to_vec::<bool>().unwrap(), vec![true, true, true]);
    assert!(!ops::all_all(&b, false).unwrap().item::<bool>().unwrap());
    assert!(ops::any_all(&b, false).unwrap().item::<bool>().unwrap());
}

#[test]
fn integer_and_low_precision_sums() {
    let i = iarr(&[1, 2, 3, 4], &[2, 2]);
    let s = ops::sum(&i, &[0], false).unwrap();
    assert_eq!(ints(&s), vec![4, 6]);
    let h = ops::astype(&arr(&data(64, 3), &[64]), Dtype::Bfloat16).unwrap();
    let hv: Vec<f64> = h.to_vec::<bf16>().unwrap().iter().map(|v| v.to_f64()).collect();
    let s = ops::sum_all(&h, false).unwrap();
    assert_eq!(s.dtype(), Dtype::Bfloat16);
    assert_close(&vals(&s), &[hv.iter().sum()], 2e-2);
}

#[test]
fn reductions_of_non_contiguous_views() {
    let (d, a) = matrix();
    let t = ops::transpose(&a, &[1, 0]).unwrap();
    assert_close(&vals(&ops::sum(&t, &[1], false).unwrap()), &reduce_ref(&d, 0, |x| x.iter().sum()), 1e-5);
    let b = ops::broadcast_to(&arr(&[1.0, 2.0, 3.0], &[1, 3]), &[4, 3]).unwrap();
    assert_eq!(vals(&ops::sum(&b, &[0], false).unwrap()), vec![4.0, 8.0, 12.0]);
}

#[test]
fn reductions_of_empty_arrays() {
    let e = Array::from_slice::<f32>(&[], &[0]).unwrap();
    assert_eq!(vals(&ops::sum_all(&e, false).unwrap()), vec![0.0]);
    assert_eq!(vals(&ops::prod_all(&e, false).unwrap()), vec![1.0]);
    assert!(ops::all_all(&ops::astype(&e, Dtype::Bool).unwrap(), false).unwrap().item::<bool>().unwrap());
    assert!(!ops::any_all(&ops::astype(&e, Dtype::Bool).unwrap(), false).unwrap().item::<bool>().unwrap());
    let m = ops::mean_all(&e, false).unwrap();
    assert!(vals(&m)[0].is_nan());
    let e2 = Array::from_slice::<f32>(&[], &[2, 0]).unwrap();
    assert_eq!(vals(&ops::sum(&e2, &[1], false).unwrap()), vec![0.0, 0.0]);
    assert_eq!(ops::sum(&e2, &[0], false).unwrap().shape(), vec![0]);
    // Extremes of nothing are undefined: MLX refuses them.
    expect_err(ops::max_all(&e, false), "max");
    expect_err(ops::min(&e2, &[1], false), "min");
    expect_err(ops::argmax(&e, 0, false), "argmax");
}

#[test]
fn reductions_with_out_of_range_axes() {
    let a = iota(&[2, 3]);
    for (f, name) in named_ops!(Reduction; sum, mean, max, min, prod, all, any, logsumexp, var, std) {
        expect_err(f(&a, &[2], false), name);
        expect_err(f(&a, &[-3], false), name);
        expect_err(f(&a, &[0, 0], false), name);
    }
    expect_err(ops::argmax(&a, 2, false), "argmax");
    expect_err(ops::argmin(&a, -3, false), "argmin");
    expect_err(ops::softmax(&a, &[2], false), "softmax");
    expect_err(ops::softmax(&a, &[], false), "softmax");
}

#[test]
fn argmax_and_argmin() {
    let a = arr(&[1.0, 5.0, 3.0, 7.0, 2.0, 7.0], &[2, 3]);
    let am = ops::argmax(&a, 1, false).unwrap();
    assert_eq!(am.dtype(), Dtype::Uint32);
    assert_eq!(am.to_vec::<u32>().unwrap(), vec![1, 0]); // ties pick the first
    assert_eq!(ops::argmax(&a, 0, true).unwrap().shape(), vec![1, 3]);
    assert_eq!(ops::argmax(&a, -2, false).unwrap().to_vec::<u32>().unwrap(), vec![1, 0, 1]);
    assert_eq!(ops::argmin(&a, 1, false).unwrap().to_vec::<u32>().unwrap(), vec![0, 1]);
    // On a transposed view.
    let t = ops::transpose(&a, &[1, 0]).unwrap();
    assert_eq!(ops::argmax(&t, 1, false).unwrap().to_vec::<u32>().unwrap(), vec![1, 0, 1]);
}

#[test]
fn softmax_matches_f64() {
    let (d, a) = matrix();
    let s = ops::softmax(&a, &[-1], false).unwrap();
    assert_close(&vals(&s), &softmax_ref(&wide(&d), COLS), 1e-6);
    let sp = ops::softmax(&a, &[1], true).unwrap();
    assert_close(&vals(&sp), &softmax_ref(&wide(&d), COLS), 1e-6);
    // Along axis 0: softmax of the transpose, transposed back.
    let s0 = ops::softmax(&a, &[0], false).unwrap();
    let dt = common::permute_ref(&wide(&d), &[ROWS, COLS], &[1, 0]);
    let want = common::permute_ref(&softmax_ref(&dt, ROWS), &[COLS, ROWS], &[1, 0]);
    assert_close(&vals(&s0), &want, 1e-6);
    // Over both axes.
    let sa = ops::softmax(&a, &[0, 1], false).unwrap();
    assert_close(&vals(&sa), &softmax_ref(&wide(&d), ROWS * COLS), 1e-6);
    // Large logits do not overflow, -inf gets zero weight.
    let big = arr(&[1000.0, 1001.0, f32::NEG_INFINITY], &[3]);
    assert_close(
        &vals(&ops::softmax(&big, &[0], false).unwrap()),
        &softmax_ref(&[0.0, 1.0, f64::NEG_INFINITY], 3),
        1e-6,
    );
}

#[test]
fn softmax_in_low_precision() {
    let d = data(32, 9).iter().map(|v| v * 8.0).collect::<Vec<_>>();
    for precise in [false, true] {
        let h = ops::astype(&arr(&d, &[32]), Dtype::Bfloat16).unwrap();
        // The reference starts from the rounded inputs.
        let hv: Vec<f64> = h.to_vec::<bf16>().unwrap().iter().map(|v| v.to_f64()).collect();
        let want = softmax_ref(&hv, 32);
        let s = ops::softmax(&h, &[0], precise).unwrap();
        assert_eq!(s.dtype(), Dtype::Bfloat16);
        let got = vals(&s);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!((f64::from(g) - w).abs() <= 1e-2 * w.max(0.05), "index {i}: {g} vs {w}");
        }
    }
}

#[test]
fn logsumexp_is_stable() {
    let a = arr(&[1000.0, 1000.0, -1000.0], &[3]);
    assert_close(&vals(&ops::logsumexp(&a, &[0], false).unwrap()), &[1000.0 + 2f64.ln()], 1e-6);
}

#[test]
fn scans_match_f64() {
    let a = arr(&[1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 2.0, -3.0], &[2, 4]);
    assert_eq!(vals(&ops::cumsum(&a, 1, false, true).unwrap()), vec![1.0, 3.0, 6.0, 10.0, -1.0, -0.5, 1.5, -1.5]);
    assert_eq!(vals(&ops::cumsum(&a, 1, false, false).unwrap()), vec![0.0, 1.0, 3.0, 6.0, 0.0, -1.0, -0.5, 1.5]);
    assert_eq!(vals(&ops::cumsum(&a, 1, true, true).unwrap()), vec![10.0, 9.0, 7.0, 4.0, -1.5, -0.5, -1.0, -3.0]);
    assert_eq!(vals(&ops::cumsum(&a, 1, true, false).unwrap()), vec![9.0, 7.0, 4.0, 0.0, -0.5, -1.0, -3.0, 0.0]);
    assert_eq!(vals(&ops::cumsum(&a, 0, false, true).unwrap()), vec![1.0, 2.0, 3.0, 4.0, 0.0, 2.5, 5.0, 1.0]);
    assert_eq!(vals(&ops::cumsum(&a, -2, false, true).unwrap()), vec![1.0, 2.0, 3.0, 4.0, 0.0, 2.5, 5.0, 1.0]);
    assert_eq!(vals(&ops::cumprod(&a, 1, false, true).unwrap()), vec![1.0, 2.0, 6.0, 24.0, -1.0, -0.5, -1.0, 3.0]);
    assert_eq!(vals(&ops::cummax(&a, 1, false, true).unwrap()), vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 2.0, 2.0]);
    assert_eq!(vals(&ops::cummin(&a, 1, false, true).unwrap()), vec![1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -3.0]);
    let d = [0.5f64, -1.0, 2.0, 0.25];
    let want: Vec<f64> = (1..=4).map(|n| lse(&d[..n])).collect();
    let got = ops::logcumsumexp(&arr(&[0.5, -1.0, 2.0, 0.25], &[4]), 0, false, true).unwrap();
    assert_close(&vals(&got), &want, 1e-6);
    // Integer cumsum stays integral; a transposed view scans logically.
    assert_eq!(ints(&ops::cumsum(&iarr(&[1, 2, 3], &[3]), 0, false, true).unwrap()), vec![1, 3, 6]);
    let t = ops::transpose(&a, &[1, 0]).unwrap();
    assert_eq!(vals(&ops::cumsum(&t, 0, false, true).unwrap()), vec![1.0, -1.0, 3.0, -0.5, 6.0, 1.5, 10.0, -1.5]);
    // Scans of empty arrays are empty.
    assert_eq!(ops::cumsum(&Array::from_slice::<f32>(&[], &[0]).unwrap(), 0, false, true).unwrap().shape(), vec![0]);
}

#[test]
fn scans_with_out_of_range_axes() {
    let a = iota(&[2, 3]);
    expect_err(ops::cumsum(&a, 2, false, true), "cumsum");
    expect_err(ops::cumsum(&a, -3, false, true), "cumsum");
    expect_err(ops::cumprod(&a, 5, false, true), "cumprod");
    expect_err(ops::cummax(&a, 2, false, true), "cummax");
    expect_err(ops::cummin(&a, 2, false, true), "cummin");
    expect_err(ops::logcumsumexp(&a, 2, false, true), "logcumsumexp");
}

#[test]
fn sort_and_argsort() {
    let d = data(24, 17);
    let a = arr(&d, &[4, 6]);
    let s = ops::sort(&a, 1).unwrap();
    let idx = ops::argsort(&a, 1).unwrap();
    assert_eq!(idx.dtype(), Dtype::Uint32);
    let sv = vals(&s);
    let iv = idx.to_vec::<u32>().unwrap();
    for r in 0..4 {
        let mut row = d[r * 6..(r + 1) * 6].to_vec();
        row.sort_by(f32::total_cmp);
        assert_eq!(sv[r * 6..(r + 1) * 6], row[..], "row {r}");
        let gathered: Vec<f32> = iv[r * 6..(r + 1) * 6].iter().map(|&i| d[r * 6 + i as usize]).collect();
        assert_eq!(gathered, row, "argsort row {r}");
    }
    // Along axis 0 (non-contiguous in memory) and with a negative axis.
    let s0 = vals(&ops::sort(&a, 0).unwrap());
    for c in 0..6 {
        let mut col: Vec<f32> = (0..4).map(|r| d[r * 6 + c]).collect();
        col.sort_by(f32::total_cmp);
        assert_eq!((0..4).map(|r| s0[r * 6 + c]).collect::<Vec<_>>(), col);
    }
    assert_eq!(vals(&ops::sort(&a, -1).unwrap()), sv);
    // Integers, and a stable argsort of ties.
    assert_eq!(ints(&ops::sort(&iarr(&[3, -1, 2, -1], &[4]), 0).unwrap()), vec![-1, -1, 2, 3]);
    assert_eq!(ops::argsort(&arr(&[2.0, 1.0, 2.0, 1.0], &[4]), 0).unwrap().to_vec::<u32>().unwrap(), vec![1, 3, 0, 2]);
    // Empty arrays sort to empty arrays.
    assert_eq!(ops::sort(&Array::from_slice::<f32>(&[], &[0]).unwrap(), 0).unwrap().shape(), vec![0]);

    expect_err(ops::sort(&a, 2), "sort");
    expect_err(ops::argsort(&a, -3), "argsort");
}

#[test]
fn topk_returns_the_largest() {
    let d = data(30, 23);
    let a = arr(&d, &[3, 10]);
    let t = ops::topk(&a, 3, 1).unwrap();
    assert_eq!(t.shape(), vec![3, 3]);
    let tv = vals(&t);
    for r in 0..3 {
        let mut row = d[r * 10..(r + 1) * 10].to_vec();
        row.sort_by(|x, y| y.total_cmp(x));
        let mut got = tv[r * 3..(r + 1) * 3].to_vec();
        got.sort_by(|x, y| y.total_cmp(x));
        assert_eq!(got, row[..3], "row {r}");
    }
    let t0 = ops::topk(&a, 1, 0).unwrap();
    assert_eq!(t0.shape(), vec![1, 10]);
    let t_all = ops::topk(&a, 10, -1).unwrap();
    assert_eq!(t_all.shape(), vec![3, 10]);

    expect_err(ops::topk(&a, 3, 2), "topk");
    expect_err(ops::topk(&a, 3, -3), "topk");
    expect_err(ops::topk(&a, 11, 1), "topk");
    expect_err(ops::topk(&a, -1, 1), "topk");
}

#[test]
fn argpartition_and_partition() {
    let d = [5.0f32, 1.0, 4.0, 2.0, 3.0, 0.0, 6.0];
    let a = arr(&d, &[7]);
    for kth in [0, 3, 6] {
        let idx = ops::argpartition(&a, kth, 0).unwrap().to_vec::<u32>().unwrap();
        let p: Vec<f32> = idx.iter().map(|&i| d[i as usize]).collect();
        // The kth element is in its sorted place, smaller ones before, larger after.
        assert_eq!(p[kth as usize], kth as f32, "kth {kth}: {p:?}");
        assert!(p[..kth as usize].iter().all(|&v| v <= kth as f32), "kth {kth}: {p:?}");
        assert!(p[kth as usize + 1..].iter().all(|&v| v >= kth as f32), "kth {kth}: {p:?}");
        let mut sorted_idx = idx.clone();
        sorted_idx.sort_unstable();
        assert_eq!(sorted_idx, (0..7).collect::<Vec<u32>>());
        let pv = vals(&ops::partition(&a, kth, 0).unwrap());
        assert_eq!(pv[kth as usize], kth as f32);
    }
    // Negative kth counts from the end.
    let pv = vals(&ops::partition(&a, -1, 0).unwrap());
    assert_eq!(pv[6], 6.0);
    let m = ops::argpartition(&arr(&data(12, 5), &[3, 4]), 1, 1).unwrap();
    assert_eq!(m.shape(), vec![3, 4]);

    expect_err(ops::argpartition(&a, 7, 0), "argpartition");
    expect_err(ops::argpartition(&a, 0, 1), "argpartition");
    expect_err(ops::partition(&a, 0, -2), "partition");
}
