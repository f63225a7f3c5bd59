// SPDX-License-Identifier: EUPL-1.2
//! Indexing: slices and slice updates (fixed, strided and dynamic), take,
//! take_along_axis and put_along_axis, with their errors.

mod common;

use common::{arr, expect_err, iarr, ints, iota, vals};
use mlx::{Array, Dtype, Error, ops};

#[test]
fn slice_selects_a_region() {
    let a = iota(&[3, 4]);
    let s = ops::slice(&a, &[1, 1], &[3, 3]).unwrap();
    assert_eq!(s.shape(), vec![2, 2]);
    assert_eq!(vals(&s), vec![5.0, 6.0, 9.0, 10.0]);
    // Negative bounds count from the end; out-of-range bounds are clamped.
    let s = ops::slice(&a, &[-1, -3], &[100, -1]).unwrap();
    assert_eq!(vals(&s), vec![9.0, 10.0]);
    let s = ops::slice(&a, &[2, 0], &[1, 4]).unwrap();
    assert_eq!(s.shape(), vec![0, 4]);
    assert!(vals(&s).is_empty());
    let s = ops::slice_axis(&a, -1, 1, 3).unwrap();
    assert_eq!(vals(&s), vec![1.0, 2.0, 5.0, 6.0, 9.0, 10.0]);
    let s = ops::slice_axis(&a, 0, 2, 3).unwrap();
    assert_eq!(vals(&s), vec![8.0, 9.0, 10.0, 11.0]);
}

#[test]
fn slice_errors() {
    let a = iota(&[3, 4]);
    let e = expect_err(ops::slice(&a, &[0], &[1]), "slice");
    assert!(matches!(e, Error::InvalidArgument { .. }));
    expect_err(ops::slice(&a, &[0, 0, 0], &[1, 1, 1]), "slice");
    expect_err(ops::slice(&a, &[0, 0], &[1]), "slice");
    expect_err(ops::slice_strided(&a, &[0, 0], &[3, 4], &[1, 0]), "slice");
    expect_err(ops::slice_axis(&a, 2, 0, 1), "slice_axis");
    expect_err(ops::slice_axis(&a, -3, 0, 1), "slice_axis");
}

#[test]
fn slice_dynamic_reads_at_an_array_offset() {
    let a = iota(&[4, 5]);
    let start = iarr(&[1, 2], &[2]);
    let s = ops::slice_dynamic(&a, &start, &[0, 1], &[2, 3]).unwrap();
    assert_eq!(s.shape(), vec![2, 3]);
    assert_eq!(vals(&s), vec![7.0, 8.0, 9.0, 12.0, 13.0, 14.0]);
    // One axis only.
    let s = ops::slice_dynamic(&a, &iarr(&[3], &[1]), &[0], &[1, 5]).unwrap();
    assert_eq!(vals(&s), vec![15.0, 16.0, 17.0, 18.0, 19.0]);
    expect_err(ops::slice_dynamic(&a, &arr(&[1.0], &[1]), &[0], &[1, 5]), "slice_dynamic");
}

#[test]
fn slice_update_writes_a_region() {
    let z = ops::zeros(&[3, 4], Dtype::Float32).unwrap();
    let upd = arr(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let out = ops::slice_update(&z, &upd, &[1, 2], &[3, 4]).unwrap();
    assert_eq!(vals(&out), vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0]);
    // The source is unchanged (values, not references).
    assert_eq!(vals(&z), vec![0.0; 12]);
    // The update broadcasts.
    let out = ops::slice_update(&z, &Array::scalar(5.0f32), &[0, 0], &[1, 4]).unwrap();
    assert_eq!(vals(&out)[..5], [5.0, 5.0, 5.0, 5.0, 0.0]);
    // Strided: every other column.
    let out = ops::slice_update_strided(&z, &arr(&[1.0, 2.0], &[1, 2]), &[2, 0], &[3, 4], &[1, 2]).unwrap();
    assert_eq!(vals(&out)[8..], [1.0, 0.0, 2.0, 0.0]);
    // A transposed update is written in logical order.
    let t = ops::transpose(&arr(&[1.0, 2.0, 3.0, 4.0], &[2, 2]), &[1, 0]).unwrap();
    let out = ops::slice_update(&z, &t, &[0, 0], &[2, 2]).unwrap();
    assert_eq!(vals(&out)[..6], [1.0, 3.0, 0.0, 0.0, 2.0, 4.0]);
}

#[test]
fn slice_update_errors() {
    let z = ops::zeros(&[3, 4], Dtype::Float32).unwrap();
    let upd = arr(&[1.0, 2.0, 3.0], &[1, 3]);
    expect_err(ops::slice_update(&z, &upd, &[0, 0], &[1, 2]), "slice_update");
    expect_err(ops::slice_update(&z, &upd, &[0], &[1]), "slice_update");
    expect_err(ops::slice_update_strided(&z, &upd, &[0, 0], &[1, 3], &[0, 1]), "slice_update");
}

#[test]
fn slice_update_dynamic_writes_at_an_array_offset() {
    let z = ops::zeros(&[3, 3], Dtype::Int32).unwrap();
    let upd = iarr(&[7, 8], &[1, 2]);
    let out = ops::slice_update_dynamic(&z, &upd, &iarr(&[2, 1], &[2]), &[0, 1]).unwrap();
    assert_eq!(ints(&out), vec![0, 0, 0, 0, 0, 0, 0, 7, 8]);
    expect_err(
        ops::slice_update_dynamic(&z, &iarr(&[1; 8], &[2, 4]), &iarr(&[0, 0], &[2]), &[0, 1]),
        "slice_update_dynamic",
    );
}

#[test]
fn take_along_an_axis_and_flat() {
    let a = iota(&[3, 4]);
    let rows = ops::take(&a, &iarr(&[2, 0], &[2]), 0).unwrap();
    assert_eq!(rows.shape(), vec![2, 4]);
    assert_eq!(vals(&rows), vec![8.0, 9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 3.0]);
    let cols = ops::take(&a, &iarr(&[3, 3, 1], &[3]), 1).unwrap();
    assert_eq!(cols.shape(), vec![3, 3]);
    assert_eq!(vals(&cols), vec![3.0, 3.0, 1.0, 7.0, 7.0, 5.0, 11.0, 11.0, 9.0]);
    // Index arrays of any shape; the result takes their shape at the axis.
    let r = ops::take(&a, &iarr(&[0, 1, 1, 2], &[2, 2]), 0).unwrap();
    assert_eq!(r.shape(), vec![2, 2, 4]);
    // Flat indices, including a negative one counting from the end.
    let f = ops::take_flat(&a, &iarr(&[0, 5, 11, -1], &[2, 2])).unwrap();
    assert_eq!(f.shape(), vec![2, 2]);
    assert_eq!(vals(&f), vec![0.0, 5.0, 11.0, 11.0]);
    // Unsigned and 64-bit index types work as well.
    let u = Array::from_vec(&[1u32, 2]).unwrap();
    assert_eq!(vals(&ops::take(&a, &u, 0).unwrap())[..4], [4.0, 5.0, 6.0, 7.0]);
    let l = Array::from_vec(&[2i64]).unwrap();
    assert_eq!(vals(&ops::take(&a, &l, 0).unwrap()), vec![8.0, 9.0, 10.0, 11.0]);
    // Taking from a transposed view.
    let t = ops::transpose(&a, &[1, 0]).unwrap();
    assert_eq!(vals(&ops::take(&t, &iarr(&[1], &[1]), 0).unwrap()), vec![1.0, 5.0, 9.0]);
    // Empty indices give an empty result.
    let e = ops::take(&a, &Array::from_slice::<i32>(&[], &[0]).unwrap(), 0).unwrap();
    assert_eq!(e.shape(), vec![0, 4]);
    assert!(vals(&e).is_empty());
}

#[test]
fn take_errors() {
    let a = iota(&[3, 4]);
    let e = expect_err(ops::take(&a, &arr(&[0.0, 1.0], &[2]), 0), "take");
    assert!(!e.to_string().is_empty());
    expect_err(ops::take_flat(&a, &arr(&[0.0], &[1])), "take");
    expect_err(ops::take(&a, &iarr(&[0], &[1]), 2), "take");
    expect_err(ops::take(&a, &iarr(&[0], &[1]), -3), "take");
    // Taking from an empty axis is refused (there is nothing to take).
    expect_err(ops::take(&Array::from_slice::<f32>(&[], &[0, 2]).unwrap(), &iarr(&[0], &[1]), 0), "take");
}

#[test]
fn take_along_axis_gathers_per_position() {
    let a = arr(&[10.0, 30.0, 20.0, 5.0, 4.0, 6.0], &[2, 3]);
    let idx = ops::argsort(&a, 1).unwrap();
    let sorted = ops::take_along_axis(&a, &idx, 1).unwrap();
    assert_eq!(vals(&sorted), vec![10.0, 20.0, 30.0, 4.0, 5.0, 6.0]);
    let idx = iarr(&[1, 0], &[1, 2]);
    let g = ops::take_along_axis(&ops::transpose(&a, &[1, 0]).unwrap(), &idx, 0).unwrap();
    // transpose is [[10,5],[30,4],[20,6]]; row 1 of column 0, row 0 of column 1.
    assert_eq!(vals(&g), vec![30.0, 5.0]);
    // Index shape broadcasts against the other axes.
    let g = ops::take_along_axis(&a, &iarr(&[2], &[1, 1]), 1).unwrap();
    assert_eq!(vals(&g), vec![20.0, 6.0]);

    // Indices must broadcast against the other axes: [3, 1] does not fit [2, _].
    expect_err(ops::take_along_axis(&a, &iarr(&[0, 0, 0], &[3, 1]), 1), "take_along_axis");
    expect_err(ops::take_along_axis(&a, &iarr(&[0], &[1, 1]), 2), "take_along_axis");
    expect_err(ops::take_along_axis(&a, &arr(&[0.0], &[1, 1]), 1), "take_along_axis");
}

#[test]
fn put_along_axis_scatters_per_position() {
    let z = ops::zeros(&[2, 3], Dtype::Float32).unwrap();
    let idx = iarr(&[2, 0], &[2, 1]);
    let v = arr(&[1.0, 2.0], &[2, 1]);
    let out = ops::put_along_axis(&z, &idx, &v, 1).unwrap();
    assert_eq!(vals(&out), vec![0.0, 0.0, 1.0, 2.0, 0.0, 0.0]);
    // Values broadcast.
    let out = ops::put_along_axis(&z, &iarr(&[1, 1, 1], &[1, 3]), &Array::scalar(9.0f32), 0).unwrap();
    assert_eq!(vals(&out), vec![0.0, 0.0, 0.0, 9.0, 9.0, 9.0]);
    // take_along_axis reads back what put_along_axis wrote.
    let back = ops::take_along_axis(&ops::put_along_axis(&z, &idx, &v, 1).unwrap(), &idx, 1).unwrap();
    assert_eq!(vals(&back), vec![1.0, 2.0]);

    expect_err(ops::put_along_axis(&z, &idx, &v, 2), "put_along_axis");
    expect_err(ops::put_along_axis(&z, &iarr(&[0, 0, 0], &[3, 1]), &v, 1), "put_along_axis");
    expect_err(ops::put_along_axis(&z, &arr(&[0.0, 0.0], &[2, 1]), &v, 1), "put_along_axis");
}

// MLX does not bounds-check gather/scatter indices or dynamic slice starts;
// the shim clamps them so that safe code can never touch memory outside the
// array. A negative index counts from the end once, then anything still
// outside the axis is clamped to the nearest valid position.

#[test]
fn out_of_range_take_indices_are_clamped() {
    let a = iota(&[2, 3]);
    let t = ops::take(&a, &iarr(&[5, -7, 100, -1, 1], &[5]), 1).unwrap();
    assert_eq!(vals(&t), vec![2.0, 0.0, 2.0, 2.0, 1.0, 5.0, 3.0, 5.0, 5.0, 4.0]);
    let f = ops::take_flat(&a, &iarr(&[6, -100, i32::MAX, i32::MIN], &[4])).unwrap();
    assert_eq!(vals(&f), vec![5.0, 0.0, 5.0, 0.0]);
    // Narrow and unsigned index types too.
    let i8s = Array::from_vec(&[-128i8, 127, -2]).unwrap();
    assert_eq!(vals(&ops::take_flat(&a, &i8s).unwrap()), vec![0.0, 5.0, 4.0]);
    let u = Array::from_vec(&[u32::MAX, 3]).unwrap();
    assert_eq!(vals(&ops::take(&a, &u, 1).unwrap()), vec![2.0, 2.0, 5.0, 5.0]);
    let u64s = Array::from_vec(&[u64::MAX]).unwrap();
    assert_eq!(vals(&ops::take(&a, &u64s, 0).unwrap()), vec![3.0, 4.0, 5.0]);
}

#[test]
fn out_of_range_take_along_axis_indices_are_clamped() {
    let a = iota(&[2, 3]);
    let t = ops::take_along_axis(&a, &iarr(&[1, 7, -9, 2], &[2, 2]), 1).unwrap();
    assert_eq!(vals(&t), vec![1.0, 2.0, 3.0, 5.0]);
}

#[test]
fn out_of_range_put_along_axis_indices_are_clamped() {
    let z = ops::zeros(&[2, 3], Dtype::Float32).unwrap();
    let out = ops::put_along_axis(&z, &iarr(&[1000, -1000], &[2, 1]), &arr(&[1.0, 2.0], &[2, 1]), 1).unwrap();
    assert_eq!(vals(&out), vec![0.0, 0.0, 1.0, 2.0, 0.0, 0.0]);
    // Scattering into an empty array is a no-op whatever the indices say.
    let e = Array::from_slice::<f32>(&[], &[0, 3]).unwrap();
    let out = ops::put_along_axis(&e, &iarr(&[9], &[1, 1]), &Array::scalar(1.0f32), 1).unwrap();
    assert_eq!(out.shape(), vec![0, 3]);
}

#[test]
fn out_of_range_dynamic_slice_starts_are_clamped() {
    let a = iota(&[4, 3]);
    let s = ops::slice_dynamic(&a, &iarr(&[10], &[1]), &[0], &[2, 3]).unwrap();
    assert_eq!(vals(&s), vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
    // A negative start counts from the end.
    let s = ops::slice_dynamic(&a, &iarr(&[-1], &[1]), &[0], &[1, 3]).unwrap();
    assert_eq!(vals(&s), vec![9.0, 10.0, 11.0]);
    // A zero-dimensional start works for one axis.
    let s = ops::slice_dynamic(&a, &Array::scalar(2u32), &[0], &[1, 3]).unwrap();
    assert_eq!(vals(&s), vec![6.0, 7.0, 8.0]);
    // A start that is itself a view (reversed, or broadcast) is read logically.
    let rev = ops::slice_strided(&iarr(&[1, 2], &[2]), &[1], &[-3], &[-1]).unwrap(); // [2, 1]
    let s = ops::slice_dynamic(&a, &rev, &[0, 1], &[1, 2]).unwrap();
    assert_eq!(vals(&s), vec![7.0, 8.0]);
    let bc = ops::broadcast_to(&iarr(&[1], &[1]), &[2]).unwrap(); // [1, 1]
    let s = ops::slice_dynamic(&a, &bc, &[0, 1], &[1, 2]).unwrap();
    assert_eq!(vals(&s), vec![4.0, 5.0]);
    expect_err(ops::slice_dynamic(&a, &iarr(&[0], &[1]), &[0], &[5, 3]), "slice_dynamic");
    expect_err(ops::slice_dynamic(&a, &iarr(&[0], &[1]), &[0], &[-1, 3]), "slice_dynamic");
    expect_err(ops::slice_dynamic(&a, &iarr(&[0], &[1]), &[2], &[1, 3]), "slice_dynamic");
    expect_err(ops::slice_dynamic(&a, &iarr(&[0, 0], &[2]), &[0], &[1, 3]), "slice_dynamic");

    let z = ops::zeros(&[3, 3], Dtype::Int32).unwrap();
    let out = ops::slice_update_dynamic(&z, &iarr(&[7, 8], &[1, 2]), &iarr(&[99, 99], &[2]), &[0, 1]).unwrap();
    assert_eq!(ints(&out), vec![0, 0, 0, 0, 0, 0, 0, 7, 8]);
    let out = ops::slice_update_dynamic(&z, &iarr(&[7, 8, 9], &[3]), &iarr(&[-5], &[1]), &[0]).unwrap();
    assert_eq!(ints(&out), vec![7, 8, 9, 0, 0, 0, 0, 0, 0]);
    // An update with more dimensions than the source is refused (MLX itself
    // would underflow an unsigned difference here).
    expect_err(ops::slice_update_dynamic(&z, &iarr(&[1], &[1, 1, 1]), &iarr(&[0], &[1]), &[0]), "slice_update_dynamic");
    expect_err(ops::slice_update_dynamic(&z, &iarr(&[1], &[1, 1]), &arr(&[0.0], &[1]), &[0]), "slice_update_dynamic");
}
