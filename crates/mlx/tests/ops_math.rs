// SPDX-License-Identifier: EUPL-1.2
//! Creation, elementwise arithmetic and math, comparisons, `where`, `astype`
//! and matmul, checked against float64 references; bad broadcasts and dtypes.

#[macro_use]
mod common;

use common::{arr, assert_close, data, expect_err, iarr, ints, iota, matmul_ref, vals, wide};
use half::{bf16, f16};
use mlx::{Array, Complex64, Dtype, ops};

const X: [f32; 8] = [-2.5, -1.0, -0.3, 0.0, 0.2, 0.5, 1.0, 3.0];
const POS: [f32; 6] = [0.01, 0.2, 0.5, 1.0, 2.5, 10.0];

fn unary_case(f: fn(&Array) -> mlx::Result<Array>, r: fn(f64) -> f64, input: &[f32], tol: f64) {
    let a = arr(input, &[input.len() as i32]);
    let expected: Vec<f64> = input.iter().map(|&x| r(f64::from(x))).collect();
    assert_close(&vals(&f(&a).unwrap()), &expected, tol);
}

fn erf64(x: f64) -> f64 {
    // Abramowitz–Stegun 7.1.26 is too coarse; use the series / continued
    // fraction pair which is exact to ~1e-15 over the range tested.
    if x.abs() < 2.5 {
        let mut sum = x;
        let mut term = x;
        for n in 1..60 {
            let n = f64::from(n);
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc continued fraction (Lentz), enough for |x| >= 2.5.
        let z = x.abs();
        let mut f = 0.0;
        for k in (1..80).rev() {
            f = f64::from(k) / 2.0 / (z + f);
        }
        let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f);
        x.signum() * (1.0 - erfc)
    }
}

#[test]
fn unary_math_matches_f64() {
    unary_case(ops::abs, f64::abs, &X, 0.0);
    unary_case(ops::negative, |x| -x, &X, 0.0);
    unary_case(ops::sign, |x| if x == 0.0 { 0.0 } else { x.signum() }, &X, 0.0);
    unary_case(ops::exp, f64::exp, &X, 1e-6);
    unary_case(ops::log, f64::ln, &POS, 1e-6);
    unary_case(ops::log1p, f64::ln_1p, &[-0.5, -1e-4, 0.0, 1e-6, 0.3, 5.0], 1e-6);
    unary_case(ops::sqrt, f64::sqrt, &POS, 1e-6);
    unary_case(ops::rsqrt, |x| 1.0 / x.sqrt(), &POS, 1e-6);
    unary_case(ops::reciprocal, |x| 1.0 / x, &POS, 1e-6);
    unary_case(ops::square, |x| x * x, &X, 1e-6);
    unary_case(ops::sin, f64::sin, &X, 1e-6);
    unary_case(ops::cos, f64::cos, &X, 1e-6);
    unary_case(ops::tanh, f64::tanh, &X, 1e-6);
    unary_case(ops::sigmoid, |x| 1.0 / (1.0 + (-x).exp()), &X, 1e-6);
    unary_case(ops::erf, erf64, &[-3.0, -1.0, -0.3, 0.0, 0.2, 0.5, 1.0, 2.0, 3.0], 1e-6);
    unary_case(ops::floor, f64::floor, &X, 0.0);
    unary_case(ops::ceil, f64::ceil, &X, 0.0);
    // Round half to even.
    unary_case(ops::round, |x| x.round_ties_even(), &[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 2.51], 0.0);
    unary_case(ops::copy, |x| x, &X, 0.0);
    unary_case(ops::stop_gradient, |x| x, &X, 0.0);
    unary_case(ops::zeros_like, |_| 0.0, &X, 0.0);
    unary_case(ops::ones_like, |_| 1.0, &X, 0.0);
}

#[test]
fn unary_math_in_float64() {
    let _cpu = common::cpu_for_float64();
    let xs = [0.1f64, 0.7, 1.3, 2.9];
    let a = Array::from_slice(&xs, &[4]).unwrap();
    let e = ops::exp(&a).unwrap();
    assert_eq!(e.dtype(), Dtype::Float64);
    // MLX's CPU kernels keep the float64 dtype but evaluate exp with a
    // single-precision approximation, so only ~1e-7 relative accuracy holds.
    let got = e.to_vec::<f64>().unwrap();
    common::assert_close64(&got, &xs.map(f64::exp), 1e-6);
    let got = ops::log(&a).unwrap().to_vec::<f64>().unwrap();
    common::assert_close64(&got, &xs.map(f64::ln), 1e-6);
    // Plain arithmetic is exact float64.
    let got = ops::divide(&a, &Array::scalar(3.0f64)).unwrap().to_vec::<f64>().unwrap();
    common::assert_close64(&got, &xs.map(|x| x / 3.0), 1e-15);
}

#[test]
fn nan_and_inf_predicates() {
    let a = arr(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -1.0], &[5]);
    assert_eq!(ops::isnan(&a).unwrap().to_vec::<bool>().unwrap(), vec![true, false, false, false, false]);
    assert_eq!(ops::isinf(&a).unwrap().to_vec::<bool>().unwrap(), vec![false, true, true, false, false]);
    let log0 = vals(&ops::log(&arr(&[0.0, -1.0], &[2])).unwrap());
    assert_eq!(log0[0], f32::NEG_INFINITY);
    assert!(log0[1].is_nan());
    let b = Array::from_vec(&[true, false]).unwrap();
    assert_eq!(ops::logical_not(&b).unwrap().to_vec::<bool>().unwrap(), vec![false, true]);
}

type Binary = fn(&Array, &Array) -> mlx::Result<Array>;
type Reference = fn(f64, f64) -> f64;

#[test]
fn binary_arithmetic_matches_f64_with_broadcasting() {
    // [2, 3] with [3] broadcasts along rows.
    let a_data = [1.5f32, -2.0, 3.0, 0.5, 4.0, -6.0];
    let b_data = [2.0f32, -0.5, 4.0];
    let a = arr(&a_data, &[2, 3]);
    let b = arr(&b_data, &[3]);
    let cases: [(Binary, Reference); 9] = [
        (ops::add, |x, y| x + y),
        (ops::subtract, |x, y| x - y),
        (ops::multiply, |x, y| x * y),
        (ops::divide, |x, y| x / y),
        (ops::maximum, f64::max),
        (ops::minimum, f64::min),
        (ops::power, |x, y| x.powf(y)),
        (ops::logaddexp, |x, y| (x.exp() + y.exp()).ln()),
        (ops::floor_divide, |x, y| (x / y).floor()),
    ];
    for (i, (f, r)) in cases.iter().enumerate() {
        let out = f(&a, &b).unwrap();
        assert_eq!(out.shape(), vec![2, 3], "case {i}");
        let expected: Vec<f64> = (0..6).map(|k| r(f64::from(a_data[k]), f64::from(b_data[k % 3]))).collect();
        let got = vals(&out);
        // power of a negative base with a fractional exponent is NaN in both.
        assert_close(&got, &expected, 1e-6);
    }
}

#[test]
fn remainder_takes_the_sign_of_the_divisor() {
    let a = arr(&[7.0, -7.0, 7.0, -7.0, 5.5], &[5]);
    let b = arr(&[3.0, 3.0, -3.0, -3.0, 2.0], &[5]);
    assert_eq!(vals(&ops::remainder(&a, &b).unwrap()), vec![1.0, 2.0, -2.0, -1.0, 1.5]);
    let ai = iarr(&[7, -7, 7, -7], &[4]);
    let bi = iarr(&[3, 3, -3, -3], &[4]);
    assert_eq!(ints(&ops::remainder(&ai, &bi).unwrap()), vec![1, 2, -2, -1]);
    assert_eq!(ints(&ops::floor_divide(&ai, &bi).unwrap()), vec![2, -3, -3, 2]);
}

#[test]
fn integer_arithmetic_stays_integer() {
    let a = iarr(&[1, 2, 3], &[3]);
    let s = ops::add(&a, &a).unwrap();
    assert_eq!(s.dtype(), Dtype::Int32);
    assert_eq!(ints(&s), vec![2, 4, 6]);
    // True division of ints gives floats.
    let d = ops::divide(&a, &iarr(&[2, 2, 2], &[3])).unwrap();
    assert!(d.dtype().is_float());
    assert_eq!(vals(&d), vec![0.5, 1.0, 1.5]);
}

#[test]
fn scalar_helpers_keep_the_dtype() {
    let h = Array::from_vec(&[bf16::from_f32(1.0), bf16::from_f32(2.0)]).unwrap();
    let out = ops::multiply_scalar(&h, 1.5).unwrap();
    assert_eq!(out.dtype(), Dtype::Bfloat16);
    assert_eq!(vals(&out), vec![1.5, 3.0]);
    assert_eq!(ops::add_scalar(&h, 1.0).unwrap().dtype(), Dtype::Bfloat16);
    assert_eq!(vals(&ops::subtract_scalar(&h, 1.0).unwrap()), vec![0.0, 1.0]);
    assert_eq!(vals(&ops::divide_scalar(&h, 4.0).unwrap()), vec![0.25, 0.5]);

    let i = iarr(&[1, 2], &[2]);
    assert_eq!(ops::add_scalar(&i, 3.0).unwrap().dtype(), Dtype::Int32);
    // A fractional value cannot stay integral: the result is float.
    let f = ops::add_scalar(&i, 0.5).unwrap();
    assert_eq!(f.dtype(), Dtype::Float32);
    assert_eq!(vals(&f), vec![1.5, 2.5]);
    assert_eq!(ops::scalar_like(&i, 2.0).unwrap().dtype(), Dtype::Int32);
    assert_eq!(ops::scalar_like(&Array::from_vec(&[true]).unwrap(), 2.0).unwrap().dtype(), Dtype::Float32);
}

#[test]
fn comparisons_and_logic() {
    let a = arr(&[1.0, 2.0, 3.0, f32::NAN], &[4]);
    let b = arr(&[2.0], &[1]);
    let check = |f: Binary, want: [bool; 4]| assert_eq!(f(&a, &b).unwrap().to_vec::<bool>().unwrap(), want);
    check(ops::equal, [false, true, false, false]);
    check(ops::not_equal, [true, false, true, true]);
    check(ops::greater, [false, false, true, false]);
    check(ops::greater_equal, [false, true, true, false]);
    check(ops::less, [true, false, false, false]);
    check(ops::less_equal, [true, true, false, false]);
    let p = Array::from_vec(&[true, true, false, false]).unwrap();
    let q = Array::from_vec(&[true, false, true, false]).unwrap();
    assert_eq!(ops::logical_and(&p, &q).unwrap().to_vec::<bool>().unwrap(), vec![true, false, false, false]);
    assert_eq!(ops::logical_or(&p, &q).unwrap().to_vec::<bool>().unwrap(), vec![true, true, true, false]);
}

#[test]
fn where_selects_with_broadcasting() {
    let cond = Array::from_slice(&[true, false, false, true], &[2, 2]).unwrap();
    let x = arr(&[1.0, 2.0], &[1, 2]);
    let y = Array::scalar(-1.0f32);
    let out = ops::where_(&cond, &x, &y).unwrap();
    assert_eq!(out.shape(), vec![2, 2]);
    assert_eq!(vals(&out), vec![1.0, -1.0, -1.0, 2.0]);
    expect_err(ops::where_(&cond, &arr(&[1.0, 2.0, 3.0], &[3]), &y), "where");
}

#[test]
fn clip_bounds() {
    let a = arr(&[-3.0, -1.0, 0.0, 2.0, 5.0], &[5]);
    let lo = Array::scalar(-1.5f32);
    let hi = Array::scalar(2.5f32);
    assert_eq!(vals(&ops::clip(&a, Some(&lo), Some(&hi)).unwrap()), vec![-1.5, -1.0, 0.0, 2.0, 2.5]);
    assert_eq!(vals(&ops::clip(&a, None, Some(&hi)).unwrap()), vec![-3.0, -1.0, 0.0, 2.0, 2.5]);
    assert_eq!(vals(&ops::clip(&a, Some(&lo), None).unwrap()), vec![-1.5, -1.0, 0.0, 2.0, 5.0]);
    expect_err(ops::clip(&a, None, None), "clip");
}

#[test]
fn astype_conversions() {
    let _cpu = common::cpu_for_float64();
    let a = arr(&[1.7, -1.7, 0.5, 300.0], &[4]);
    assert_eq!(ints(&ops::astype(&a, Dtype::Int32).unwrap()), vec![1, -1, 0, 300]);
    assert_eq!(ops::astype(&a, Dtype::Bool).unwrap().to_vec::<bool>().unwrap(), vec![true, true, true, true]);
    let h = ops::astype(&a, Dtype::Float16).unwrap();
    assert_eq!(h.dtype(), Dtype::Float16);
    let hv = h.to_vec::<f16>().unwrap();
    assert_close(&hv.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), &wide(&[1.7, -1.7, 0.5, 300.0]), 1e-3);
    let b = ops::astype(&a, Dtype::Bfloat16).unwrap();
    let bv: Vec<f32> = b.to_vec::<bf16>().unwrap().iter().map(|v| v.to_f32()).collect();
    assert_close(&bv, &wide(&[1.7, -1.7, 0.5, 300.0]), 1e-2);
    let d = ops::astype(&a, Dtype::Float64).unwrap();
    assert_eq!(d.to_vec::<f64>().unwrap(), vec![1.7f32 as f64, -1.7f32 as f64, 0.5, 300.0]);
    let c = ops::astype(&a, Dtype::Complex64).unwrap();
    assert_eq!(c.to_vec::<Complex64>().unwrap()[0], Complex64 { re: 1.7, im: 0.0 });
    let u = ops::astype(&iarr(&[0, 255, 256], &[3]), Dtype::Uint8).unwrap();
    assert_eq!(u.to_vec::<u8>().unwrap(), vec![0, 255, 0]);
    // Empty arrays convert too.
    let e = ops::astype(&Array::from_slice::<f32>(&[], &[0, 3]).unwrap(), Dtype::Int64).unwrap();
    assert_eq!(e.shape(), vec![0, 3]);
    assert!(e.to_vec::<i64>().unwrap().is_empty());
}

#[test]
fn creation_ops() {
    let z = ops::zeros(&[2, 3], Dtype::Float32).unwrap();
    assert_eq!((z.shape(), vals(&z)), (vec![2, 3], vec![0.0; 6]));
    let o = ops::ones(&[3], Dtype::Int32).unwrap();
    assert_eq!(ints(&o), vec![1, 1, 1]);
    let f = ops::full(&[2, 2], &Array::scalar(7.5f32), Dtype::Bfloat16).unwrap();
    assert_eq!(f.dtype(), Dtype::Bfloat16);
    assert_eq!(vals(&f), vec![7.5; 4]);
    let f = ops::full(&[2, 3], &arr(&[1.0, 2.0, 3.0], &[3]), Dtype::Float32).unwrap();
    assert_eq!(vals(&f), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    expect_err(ops::full(&[2, 2], &arr(&[1.0, 2.0, 3.0], &[3]), Dtype::Float32), "full");

    assert_eq!(vals(&ops::arange(0.0, 5.0, 1.0, Dtype::Float32).unwrap()), vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    assert_eq!(ints(&ops::arange(10.0, 0.0, -3.0, Dtype::Int32).unwrap()), vec![10, 7, 4, 1]);
    assert_eq!(ops::arange(3.0, 3.0, 1.0, Dtype::Float32).unwrap().shape(), vec![0]);
    expect_err(ops::arange(0.0, 1.0, 0.0, Dtype::Float32), "arange");

    assert_eq!(vals(&ops::eye(2, 3, 1, Dtype::Float32).unwrap()), vec![0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    assert_eq!(vals(&ops::tri(3, 3, 0, Dtype::Float32).unwrap()), vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
    let m = iota(&[3, 3]);
    assert_eq!(vals(&ops::tril(&m, -1).unwrap()), vec![0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 6.0, 7.0, 0.0]);
    assert_eq!(vals(&ops::triu(&m, 1).unwrap()), vec![0.0, 1.0, 2.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0]);
    expect_err(ops::tril(&arr(&[1.0], &[1]), 0), "tril");

    // Negative dimensions are refused, not turned into huge allocations.
    expect_err(ops::zeros(&[-1, 2], Dtype::Float32), "zeros");
    expect_err(ops::ones(&[2, -3], Dtype::Float32), "ones");
}

#[test]
fn empty_elementwise() {
    let e = Array::from_slice::<f32>(&[], &[2, 0]).unwrap();
    let out = ops::exp(&ops::add(&e, &arr(&[1.0], &[1])).unwrap()).unwrap();
    assert_eq!(out.shape(), vec![2, 0]);
    assert!(vals(&out).is_empty());
    // [2, 0] broadcasts with [1, 0] and with a scalar, not with [3].
    let b = Array::from_slice::<f32>(&[], &[1, 0]).unwrap();
    assert_eq!(ops::multiply(&e, &b).unwrap().shape(), vec![2, 0]);
    expect_err(ops::add(&e, &arr(&[1.0, 2.0, 3.0], &[3])), "add");
}

#[test]
fn incompatible_broadcasts_name_the_op() {
    let a = iota(&[2, 3]);
    let b = iota(&[4]);
    for (f, name) in named_ops!(Binary; add, subtract, multiply, divide, maximum, equal, less, power) {
        let e = expect_err(f(&a, &b), name);
        assert!(e.to_string().to_lowercase().contains("broadcast"), "{e}");
    }
}

#[test]
fn unsupported_dtypes_name_the_op() {
    let c = Array::from_vec(&[Complex64 { re: 1.5, im: 0.5 }]).unwrap();
    expect_err(ops::floor(&c), "floor");
    expect_err(ops::erf(&c), "erf");
    let i = iarr(&[1, 2, 3, 4], &[2, 2]);
    // MLX multiplies only floating-point matrices.
    expect_err(ops::matmul(&i, &i), "matmul");
}

fn matmul_case(m: usize, k: usize, n: usize, seed: u64) {
    let a = data(m * k, seed);
    let b = data(k * n, seed + 1);
    let out = ops::matmul(&arr(&a, &[m as i32, k as i32]), &arr(&b, &[k as i32, n as i32])).unwrap();
    assert_eq!(out.shape(), vec![m as i32, n as i32]);
    assert_close(&vals(&out), &matmul_ref(&wide(&a), &wide(&b), m, k, n), common::matmul_tol(1e-5));
}

#[test]
fn matmul_matches_naive_f64() {
    matmul_case(1, 1, 1, 1);
    matmul_case(2, 3, 4, 2);
    matmul_case(7, 13, 5, 3);
    matmul_case(16, 64, 9, 4);
    // Vector-matrix and matrix-vector products drop the vector's axis.
    let v = arr(&[1.0, 2.0], &[2]);
    let m = arr(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let vm = ops::matmul(&v, &m).unwrap();
    assert_eq!((vm.shape(), vals(&vm)), (vec![2], vec![7.0, 10.0]));
    let mv = ops::matmul(&m, &v).unwrap();
    assert_eq!((mv.shape(), vals(&mv)), (vec![2], vec![5.0, 11.0]));
}

#[test]
fn batched_matmul_broadcasts_batches() {
    let (m, k, n) = (3, 4, 2);
    let a = data(2 * m * k, 11);
    let b = data(k * n, 12);
    let out = ops::matmul(&arr(&a, &[2, 3, 4]), &arr(&b, &[1, 4, 2])).unwrap();
    assert_eq!(out.shape(), vec![2, 3, 2]);
    let mut expected = matmul_ref(&wide(&a[..m * k]), &wide(&b), m, k, n);
    expected.extend(matmul_ref(&wide(&a[m * k..]), &wide(&b), m, k, n));
    assert_close(&vals(&out), &expected, common::matmul_tol(1e-5));
}

#[test]
fn matmul_of_transposed_views() {
    let a = data(12, 21);
    let at = ops::transpose(&arr(&a, &[4, 3]), &[1, 0]).unwrap(); // [3, 4]
    let b = data(8, 22);
    let out = ops::matmul(&at, &arr(&b, &[4, 2])).unwrap();
    let a_t = common::permute_ref(&wide(&a), &[4, 3], &[1, 0]);
    assert_close(&vals(&out), &matmul_ref(&a_t, &wide(&b), 3, 4, 2), common::matmul_tol(1e-5));
}

#[test]
fn matmul_in_low_precision_and_f64() {
    let (m, k, n) = (4, 32, 3);
    let a = data(m * k, 31);
    let b = data(k * n, 32);
    let expected = matmul_ref(&wide(&a), &wide(&b), m, k, n);
    for dtype in [Dtype::Bfloat16, Dtype::Float16] {
        let x = ops::astype(&arr(&a, &[m as i32, k as i32]), dtype).unwrap();
        let y = ops::astype(&arr(&b, &[k as i32, n as i32]), dtype).unwrap();
        let out = ops::matmul(&x, &y).unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_close(&vals(&out), &expected, 5e-2);
    }
    let a64: Vec<f64> = wide(&a);
    let b64: Vec<f64> = wide(&b);
    let x = Array::from_slice(&a64, &[m as i32, k as i32]).unwrap();
    let y = Array::from_slice(&b64, &[k as i32, n as i32]).unwrap();
    match ops::matmul(&x, &y).and_then(|o| o.to_vec::<f64>()) {
        Ok(got) => common::assert_close64(&got, &expected, 1e-12),
        // Some MLX backends have no float64 matmul; then it must be an error, not an abort.
        Err(e) => assert_eq!(e.op(), "matmul", "{e}"),
    }
}

#[test]
fn matmul_errors() {
    let a = iota(&[2, 3]);
    let b = iota(&[4, 2]);
    let e = expect_err(ops::matmul(&a, &b), "matmul");
    assert!(!e.to_string().is_empty());
    expect_err(ops::matmul(&Array::scalar(1.0f32), &a), "matmul");
    expect_err(ops::matmul(&iota(&[2, 2, 3]), &iota(&[3, 3, 2])), "matmul");
}

#[test]
fn matmul_with_empty_inner_dimension_is_zeros() {
    let a = Array::from_slice::<f32>(&[], &[2, 0]).unwrap();
    let b = Array::from_slice::<f32>(&[], &[0, 3]).unwrap();
    let out = ops::matmul(&a, &b).unwrap();
    assert_eq!(out.shape(), vec![2, 3]);
    assert_eq!(vals(&out), vec![0.0; 6]);
}

#[test]
fn addmm_matches_f64() {
    let a = data(6, 41);
    let b = data(6, 42);
    let c = data(4, 43);
    let out = ops::addmm(&arr(&c, &[2, 2]), &arr(&a, &[2, 3]), &arr(&b, &[3, 2]), 2.0, 0.5).unwrap();
    let ab = matmul_ref(&wide(&a), &wide(&b), 2, 3, 2);
    let expected: Vec<f64> = ab.iter().zip(&c).map(|(x, &y)| 2.0 * x + 0.5 * f64::from(y)).collect();
    assert_close(&vals(&out), &expected, common::matmul_tol(1e-5));
    expect_err(ops::addmm(&arr(&c, &[2, 2]), &arr(&a, &[2, 3]), &arr(&b, &[2, 3]), 1.0, 1.0), "addmm");
}
