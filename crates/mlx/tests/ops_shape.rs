// SPDX-License-Identifier: EUPL-1.2
//! Shape ops: reshape, transpose, expand/squeeze, broadcast, concatenate,
//! stack, split, flatten, swapaxes, repeat, pad and as_strided, with their
//! errors; reading non-contiguous views back in logical row-major order.

mod common;

use common::{arr, broadcast_ref, expect_err, iota, permute_ref, vals};
use mlx::{Array, Dtype, ops};

fn seq(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32).collect()
}

#[test]
fn reshape_keeps_row_major_order() {
    let a = iota(&[2, 3, 4]);
    let r = ops::reshape(&a, &[4, 6]).unwrap();
    assert_eq!(r.shape(), vec![4, 6]);
    assert_eq!(vals(&r), seq(24));
    let r = ops::reshape(&a, &[-1, 2]).unwrap();
    assert_eq!(r.shape(), vec![12, 2]);
    let r = ops::reshape(&a, &[24]).unwrap();
    assert_eq!(vals(&r), seq(24));
    let s = ops::reshape(&arr(&[5.0], &[1, 1]), &[]).unwrap();
    assert_eq!(s.ndim(), 0);
    // Reshaping a transposed view reads it logically.
    let t = ops::transpose(&iota(&[2, 3]), &[1, 0]).unwrap();
    assert_eq!(vals(&ops::reshape(&t, &[6]).unwrap()), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
}

#[test]
fn reshape_errors() {
    let a = iota(&[2, 3]);
    let e = expect_err(ops::reshape(&a, &[4, 2]), "reshape");
    assert!(e.to_string().contains("reshape"), "{e}");
    expect_err(ops::reshape(&a, &[-1, -1]), "reshape");
    expect_err(ops::reshape(&a, &[-1, 4]), "reshape");
    expect_err(ops::reshape(&a, &[-2, 3]), "reshape");
}

#[test]
fn reshape_of_empty_arrays() {
    let e = Array::from_slice::<f32>(&[], &[2, 0]).unwrap();
    let r = ops::reshape(&e, &[0, 5]).unwrap();
    assert_eq!(r.shape(), vec![0, 5]);
    assert!(vals(&r).is_empty());
    assert_eq!(ops::reshape(&e, &[0]).unwrap().shape(), vec![0]);
    // -1 cannot be inferred from zero elements.
    expect_err(ops::reshape(&e, &[-1, 0]), "reshape");
    expect_err(ops::reshape(&e, &[1]), "reshape");
}

#[test]
fn transpose_permutes_axes() {
    let data = seq(24);
    let a = iota(&[2, 3, 4]);
    for perm in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1], [0, 2, 1]] {
        let t = ops::transpose(&a, &perm.map(|p| p as i32)).unwrap();
        assert_eq!(t.shape(), perm.iter().map(|&p| [2, 3, 4][p]).collect::<Vec<_>>());
        assert_eq!(vals(&t), permute_ref(&data, &[2, 3, 4], &perm), "perm {perm:?}");
    }
    // Negative axes count from the end.
    let t = ops::transpose(&a, &[-1, 0, 1]).unwrap();
    assert_eq!(vals(&t), permute_ref(&data, &[2, 3, 4], &[2, 0, 1]));
    let t = ops::transpose_all(&a).unwrap();
    assert_eq!(t.shape(), vec![4, 3, 2]);
    assert_eq!(vals(&t), permute_ref(&data, &[2, 3, 4], &[2, 1, 0]));
    // Transposing a scalar is a no-op.
    assert_eq!(ops::transpose(&Array::scalar(1.0f32), &[]).unwrap().item::<f32>().unwrap(), 1.0);
}

#[test]
fn transpose_errors() {
    let a = iota(&[2, 3, 4]);
    expect_err(ops::transpose(&a, &[0, 0, 1]), "transpose");
    expect_err(ops::transpose(&a, &[0, 1]), "transpose");
    expect_err(ops::transpose(&a, &[0, 1, 3]), "transpose");
    expect_err(ops::transpose(&a, &[0, 1, 2, 3]), "transpose");
    expect_err(ops::transpose(&a, &[]), "transpose");
    expect_err(ops::swapaxes(&a, 0, 3), "swapaxes");
}

#[test]
fn expand_and_squeeze() {
    let a = iota(&[2, 3]);
    assert_eq!(ops::expand_dims(&a, &[0]).unwrap().shape(), vec![1, 2, 3]);
    assert_eq!(ops::expand_dims(&a, &[-1]).unwrap().shape(), vec![2, 3, 1]);
    assert_eq!(ops::expand_dims(&a, &[0, 3]).unwrap().shape(), vec![1, 2, 3, 1]);
    let e = ops::expand_dims(&a, &[1]).unwrap();
    assert_eq!(e.shape(), vec![2, 1, 3]);
    assert_eq!(vals(&e), seq(6));
    let s = ops::squeeze(&e, &[1]).unwrap();
    assert_eq!(s.shape(), vec![2, 3]);
    let b = iota(&[1, 2, 1, 3, 1]);
    assert_eq!(ops::squeeze(&b, &[]).unwrap().shape(), vec![2, 3]);
    assert_eq!(ops::squeeze(&b, &[-1, 0]).unwrap().shape(), vec![2, 1, 3]);

    expect_err(ops::expand_dims(&a, &[3]), "expand_dims");
    expect_err(ops::expand_dims(&a, &[0, 0]), "expand_dims");
    expect_err(ops::squeeze(&a, &[0]), "squeeze");
    expect_err(ops::squeeze(&b, &[5]), "squeeze");
}

#[test]
fn broadcast_to_reads_logically() {
    let a = arr(&[1.0, 2.0, 3.0], &[1, 3]);
    let b = ops::broadcast_to(&a, &[4, 3]).unwrap();
    assert_eq!(vals(&b), broadcast_ref(&[1.0f32, 2.0, 3.0], &[1, 3], &[4, 3]));
    let c = arr(&[1.0, 2.0], &[2, 1]);
    let b = ops::broadcast_to(&c, &[3, 2, 4]).unwrap();
    assert_eq!(vals(&b), broadcast_ref(&[1.0f32, 2.0], &[2, 1], &[3, 2, 4]));
    let s = ops::broadcast_to(&Array::scalar(7i32), &[2, 2]).unwrap();
    assert_eq!(s.to_vec::<i32>().unwrap(), vec![7; 4]);
    // A broadcast to an empty shape is empty.
    assert!(vals(&ops::broadcast_to(&a, &[0, 3]).unwrap()).is_empty());

    let e = expect_err(ops::broadcast_to(&iota(&[2, 3]), &[4, 3]), "broadcast_to");
    assert!(e.to_string().to_lowercase().contains("broadcast"), "{e}");
    expect_err(ops::broadcast_to(&iota(&[2, 3]), &[3]), "broadcast_to");
}

#[test]
fn expand_then_broadcast_then_transpose() {
    // [3] -> [3, 1] -> [3, 4] -> transposed [4, 3].
    let a = arr(&[1.0, 2.0, 3.0], &[3]);
    let e = ops::expand_dims(&a, &[1]).unwrap();
    let b = ops::broadcast_to(&e, &[3, 4]).unwrap();
    assert_eq!(vals(&b), vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]);
    let t = ops::transpose(&b, &[1, 0]).unwrap();
    assert_eq!(vals(&t), [1.0, 2.0, 3.0].repeat(4));
    // A strided slice of a broadcast of a transpose.
    let base = iota(&[2, 3]); // [[0,1,2],[3,4,5]]
    let tt = ops::transpose(&base, &[1, 0]).unwrap(); // [3, 2]
    let bb = ops::broadcast_to(&ops::expand_dims(&tt, &[0]).unwrap(), &[2, 3, 2]).unwrap();
    let s = ops::slice_strided(&bb, &[0, 0, 1], &[2, 3, 2], &[1, 2, 1]).unwrap(); // [2, 2, 1]
    assert_eq!(s.shape(), vec![2, 2, 1]);
    assert_eq!(vals(&s), vec![3.0, 5.0, 3.0, 5.0]);
}

#[test]
fn concatenate_and_stack() {
    let a = iota(&[2, 3]);
    let b = ops::add_scalar(&iota(&[1, 3]), 100.0).unwrap();
    let c = ops::concatenate(&[&a, &b], 0).unwrap();
    assert_eq!(c.shape(), vec![3, 3]);
    assert_eq!(vals(&c), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 101.0, 102.0]);
    let d = ops::concatenate(&[&a, &a], -1).unwrap();
    assert_eq!(vals(&d), vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 3.0, 4.0, 5.0]);
    // Concatenating non-contiguous views.
    let t = ops::transpose(&iota(&[3, 2]), &[1, 0]).unwrap(); // [[0,2,4],[1,3,5]]
    let e = ops::concatenate(&[&t, &a], 0).unwrap();
    assert_eq!(vals(&e)[..6], [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    // A single array concatenates to itself.
    assert_eq!(vals(&ops::concatenate(&[&a], 1).unwrap()), seq(6));

    let s = ops::stack(&[&a, &a], 1).unwrap();
    assert_eq!(s.shape(), vec![2, 2, 3]);
    assert_eq!(vals(&s), vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 3.0, 4.0, 5.0]);
}

#[test]
fn concatenate_with_empty_arrays() {
    let a = iota(&[2, 3]);
    let empty = Array::from_slice::<f32>(&[], &[0, 3]).unwrap();
    let c = ops::concatenate(&[&empty, &a, &empty], 0).unwrap();
    assert_eq!(c.shape(), vec![2, 3]);
    assert_eq!(vals(&c), seq(6));
    let both = ops::concatenate(&[&empty, &empty], 0).unwrap();
    assert_eq!(both.shape(), vec![0, 3]);
    assert!(vals(&both).is_empty());
}

#[test]
fn concatenate_errors() {
    let a = iota(&[2, 3]);
    let b = iota(&[2, 4]);
    let e = expect_err(ops::concatenate(&[&a, &b], 0), "concatenate");
    assert!(!e.to_string().is_empty());
    expect_err(ops::concatenate(&[], 0), "concatenate");
    expect_err(ops::concatenate(&[&a, &a], 2), "concatenate");
    expect_err(ops::concatenate(&[&a, &iota(&[6])], 0), "concatenate");
    expect_err(ops::stack(&[&a, &b], 0), "stack");
    expect_err(ops::stack(&[], 0), "stack");
}

#[test]
fn split_and_split_at() {
    let a = iota(&[6, 2]);
    let parts = ops::split(&a, 3, 0).unwrap();
    assert_eq!(parts.len(), 3);
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p.shape(), vec![2, 2]);
        assert_eq!(vals(p), seq(12)[i * 4..(i + 1) * 4]);
    }
    let parts = ops::split_at(&a, &[1, 4], 0).unwrap();
    let shapes: Vec<_> = parts.iter().map(Array::shape).collect();
    assert_eq!(shapes, vec![vec![1, 2], vec![3, 2], vec![2, 2]]);
    assert_eq!(vals(&parts[1]), seq(12)[2..8]);
    let cols = ops::split(&a, 2, 1).unwrap();
    assert_eq!(vals(&cols[1]), vec![1.0, 3.0, 5.0, 7.0, 9.0, 11.0]);

    expect_err(ops::split(&a, 4, 0), "split");
    expect_err(ops::split(&a, 2, 2), "split");
    expect_err(ops::split_at(&a, &[1], 3), "split");
}

#[test]
fn flatten_swapaxes_repeat_pad() {
    let a = iota(&[2, 3, 4]);
    assert_eq!(ops::flatten(&a, 0, -1).unwrap().shape(), vec![24]);
    assert_eq!(ops::flatten(&a, 1, 2).unwrap().shape(), vec![2, 12]);
    // MLX clamps an end axis past the last one, but refuses start > end.
    assert_eq!(ops::flatten(&a, 1, 5).unwrap().shape(), vec![2, 12]);
    expect_err(ops::flatten(&a, 2, 1), "flatten");
    expect_err(ops::flatten(&a, 3, 3), "flatten");

    let s = ops::swapaxes(&a, 0, 2).unwrap();
    assert_eq!(s.shape(), vec![4, 3, 2]);
    assert_eq!(vals(&s), permute_ref(&seq(24), &[2, 3, 4], &[2, 1, 0]));

    let r = ops::repeat(&arr(&[1.0, 2.0], &[2]), 3, 0).unwrap();
    assert_eq!(vals(&r), vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
    let r = ops::repeat(&iota(&[2, 2]), 2, 1).unwrap();
    assert_eq!(vals(&r), vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
    expect_err(ops::repeat(&iota(&[2, 2]), 2, 2), "repeat");

    let p = ops::pad(&arr(&[1.0, 2.0], &[1, 2]), &[0, 1], &[1, 0], &[0, 2], &Array::scalar(-1.0f32)).unwrap();
    assert_eq!(p.shape(), vec![2, 4]);
    assert_eq!(vals(&p), vec![-1.0, -1.0, -1.0, -1.0, 1.0, 2.0, -1.0, -1.0]);
    expect_err(ops::pad(&iota(&[2]), &[0], &[1, 2], &[1], &Array::scalar(0.0f32)), "pad");
    expect_err(ops::pad(&iota(&[2]), &[0], &[-1], &[0], &Array::scalar(0.0f32)), "pad");
}

#[test]
fn strided_and_reversed_slices() {
    let a = iota(&[4, 5]);
    let s = ops::slice_strided(&a, &[0, 0], &[4, 5], &[2, 2]).unwrap();
    assert_eq!(s.shape(), vec![2, 3]);
    assert_eq!(vals(&s), vec![0.0, 2.0, 4.0, 10.0, 12.0, 14.0]);
    // Negative steps walk backwards from start (inclusive) to stop (exclusive);
    // a stop of -(n + 1) means "past the beginning".
    let r = ops::slice_strided(&iota(&[4]), &[3], &[-5], &[-1]).unwrap();
    assert_eq!(vals(&r), vec![3.0, 2.0, 1.0, 0.0]);
    let r = ops::slice_strided(&a, &[3, 4], &[-5, -6], &[-2, -3]).unwrap();
    assert_eq!(r.shape(), vec![2, 2]);
    assert_eq!(vals(&r), vec![19.0, 16.0, 9.0, 6.0]);
    // A reversed view of a transposed view.
    let t = ops::transpose(&a, &[1, 0]).unwrap(); // [5, 4]
    let rt = ops::slice_strided(&t, &[4, 0], &[-6, 4], &[-1, 3]).unwrap(); // rows 4..0, cols 0 and 3
    assert_eq!(rt.shape(), vec![5, 2]);
    assert_eq!(vals(&rt), vec![4.0, 19.0, 3.0, 18.0, 2.0, 17.0, 1.0, 16.0, 0.0, 15.0]);
}

#[test]
fn as_strided_views() {
    let a = iota(&[10]);
    // Overlapping sliding windows.
    let w = ops::as_strided(&a, &[4, 3], &[2, 1], 0).unwrap();
    assert_eq!(vals(&w), vec![0.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0, 6.0, 6.0, 7.0, 8.0]);
    // An offset and a zero stride (broadcast).
    let b = ops::as_strided(&a, &[2, 3], &[0, 3], 1).unwrap();
    assert_eq!(vals(&b), vec![1.0, 4.0, 7.0, 1.0, 4.0, 7.0]);
    // A negative stride, starting at the end.
    let r = ops::as_strided(&a, &[5], &[-2], 9).unwrap();
    assert_eq!(vals(&r), vec![9.0, 7.0, 5.0, 3.0, 1.0]);
    // The source is read in its logical order even when it is a transposed view.
    let t = ops::transpose(&iota(&[2, 3]), &[1, 0]).unwrap(); // logical [0,3,1,4,2,5]
    let v = ops::as_strided(&t, &[3], &[2], 0).unwrap();
    assert_eq!(vals(&v), vec![0.0, 1.0, 2.0]);
    // ... and a broadcast source likewise.
    let bc = ops::broadcast_to(&arr(&[1.0, 2.0], &[1, 2]), &[3, 2]).unwrap(); // [1,2,1,2,1,2]
    let v = ops::as_strided(&bc, &[2, 2], &[1, 3], 1).unwrap();
    assert_eq!(vals(&v), vec![2.0, 1.0, 1.0, 2.0]);
    // Empty views are fine wherever they point.
    assert!(vals(&ops::as_strided(&a, &[0, 3], &[100, 100], 0).unwrap()).is_empty());
}

#[test]
fn as_strided_outside_the_buffer_is_refused() {
    let a = iota(&[10]);
    let e = expect_err(ops::as_strided(&a, &[4, 3], &[3, 1], 0), "as_strided");
    assert!(e.to_string().contains("outside"), "{e}");
    expect_err(ops::as_strided(&a, &[2], &[1], 9), "as_strided");
    expect_err(ops::as_strided(&a, &[1], &[1], 10), "as_strided");
    expect_err(ops::as_strided(&a, &[3], &[-1], 1), "as_strided");
    expect_err(ops::as_strided(&a, &[2, 2], &[1], 0), "as_strided");
    expect_err(ops::as_strided(&a, &[-1], &[1], 0), "as_strided");
    expect_err(ops::as_strided(&Array::from_slice::<f32>(&[], &[0]).unwrap(), &[1], &[1], 0), "as_strided");
}

fn transposed_read<T: mlx::Element + Into<f64>>(dtype: Dtype) -> Vec<f64> {
    let a = ops::astype(&iota(&[3, 4]), dtype).unwrap();
    let t = ops::transpose(&a, &[1, 0]).unwrap();
    t.eval().unwrap();
    t.to_vec::<T>().unwrap().into_iter().map(Into::into).collect()
}

#[test]
fn non_contiguous_reads_of_every_dtype() {
    let _cpu = common::cpu_for_float64();
    // The read path itself (not a conversion) must honour strides whatever
    // the element size.
    let want: Vec<f64> = permute_ref(&(0..12).map(f64::from).collect::<Vec<_>>(), &[3, 4], &[1, 0]);
    assert_eq!(transposed_read::<u8>(Dtype::Uint8), want);
    assert_eq!(transposed_read::<i16>(Dtype::Int16), want);
    assert_eq!(transposed_read::<u32>(Dtype::Uint32), want);
    assert_eq!(transposed_read::<i32>(Dtype::Int32), want);
    assert_eq!(transposed_read::<f32>(Dtype::Float32), want);
    assert_eq!(transposed_read::<f64>(Dtype::Float64), want);
    let h: Vec<f64> = {
        let t = ops::transpose(&ops::astype(&iota(&[3, 4]), Dtype::Float16).unwrap(), &[1, 0]).unwrap();
        t.to_vec::<half::f16>().unwrap().iter().map(|v| v.to_f64()).collect()
    };
    assert_eq!(h, want);
    let b: Vec<f64> = {
        let t = ops::transpose(&ops::astype(&iota(&[3, 4]), Dtype::Bfloat16).unwrap(), &[1, 0]).unwrap();
        t.to_vec::<half::bf16>().unwrap().iter().map(|v| v.to_f64()).collect()
    };
    assert_eq!(b, want);
    let i64s: Vec<f64> = {
        let t = ops::transpose(&ops::astype(&iota(&[3, 4]), Dtype::Int64).unwrap(), &[1, 0]).unwrap();
        t.to_vec::<i64>().unwrap().iter().map(|&v| v as f64).collect()
    };
    assert_eq!(i64s, want);
    let bools = {
        let t = ops::transpose(&ops::astype(&iota(&[3, 4]), Dtype::Bool).unwrap(), &[1, 0]).unwrap();
        t.to_vec::<bool>().unwrap()
    };
    assert_eq!(bools, want.iter().map(|&v| v != 0.0).collect::<Vec<_>>());
}
