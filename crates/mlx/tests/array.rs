// SPDX-License-Identifier: EUPL-1.2
//! `Array`: construction, metadata, reading back every dtype, errors of the
//! safe layer, empty arrays, non-contiguous reads and per-thread use.

mod common;

use common::{arr, expect_err, iota, vals};
use half::{bf16, f16};
use mlx::{Array, Complex64, Dtype, Element, Error, ops};

fn round_trip<T: Element + PartialEq + std::fmt::Debug>(data: &[T], shape: &[i32]) {
    let a = Array::from_slice(data, shape).unwrap();
    assert_eq!(a.dtype(), T::DTYPE);
    assert_eq!(a.shape(), shape);
    assert_eq!(a.ndim(), shape.len());
    assert_eq!(a.size(), data.len());
    assert_eq!(a.nbytes(), data.len() * T::DTYPE.size_of());
    assert_eq!(a.to_vec::<T>().unwrap(), data);
}

#[test]
fn every_dtype_round_trips() {
    round_trip(&[true, false, true, true], &[2, 2]);
    round_trip(&[0u8, 1, 254, 255], &[4]);
    round_trip(&[0u16, 1, 65535], &[3]);
    round_trip(&[0u32, 7, u32::MAX], &[3, 1]);
    round_trip(&[0u64, 7, u64::MAX], &[1, 3]);
    round_trip(&[i8::MIN, -1, 0, i8::MAX], &[2, 2]);
    round_trip(&[i16::MIN, 0, i16::MAX], &[3]);
    round_trip(&[i32::MIN, -5, 0, i32::MAX], &[4]);
    round_trip(&[i64::MIN, -5, 0, i64::MAX], &[2, 1, 2]);
    round_trip(&[f16::from_f32(1.5), f16::from_f32(-0.25), f16::MAX], &[3]);
    round_trip(&[1.5f32, -2.25, f32::MAX, f32::MIN_POSITIVE], &[2, 2]);
    round_trip(&[1.5f64, -2.25, f64::MAX, 1e-300], &[4]);
    round_trip(&[bf16::from_f32(1.5), bf16::from_f32(-3.0), bf16::from_f32(1e30)], &[3]);
    round_trip(&[Complex64 { re: 1.0, im: -2.0 }, Complex64 { re: 0.5, im: 3.0 }], &[2]);
}

#[test]
fn from_vec_is_one_dimensional() {
    let a = Array::from_vec(&[1i32, 2, 3]).unwrap();
    assert_eq!(a.shape(), vec![3]);
    assert_eq!(a.to_vec::<i32>().unwrap(), vec![1, 2, 3]);
}

#[test]
fn scalars() {
    let s = Array::scalar(2.5f32);
    assert_eq!(s.ndim(), 0);
    assert_eq!(s.shape(), Vec::<i32>::new());
    assert_eq!(s.size(), 1);
    assert_eq!(s.item::<f32>().unwrap(), 2.5);

    let s = Array::scalar_as(3.75, Dtype::Float16).unwrap();
    assert_eq!(s.dtype(), Dtype::Float16);
    assert_eq!(s.item::<f16>().unwrap(), f16::from_f32(3.75));
    let s = Array::scalar_as(-7.0, Dtype::Int64).unwrap();
    assert_eq!(s.item::<i64>().unwrap(), -7);
    let s = Array::scalar_as(1.0, Dtype::Bool).unwrap();
    assert!(s.item::<bool>().unwrap());

    assert_eq!(Array::from(1.25f32).item::<f32>().unwrap(), 1.25);
    assert_eq!(Array::from(-4i32).item::<i32>().unwrap(), -4);
    assert!(!Array::from(false).item::<bool>().unwrap());
    // One element but not zero-dimensional is fine for item.
    assert_eq!(arr(&[9.0], &[1, 1]).item::<f32>().unwrap(), 9.0);
}

#[test]
fn dim_counts_negative_axes_from_the_end() {
    let a = iota(&[2, 3, 4]);
    assert_eq!(a.dim(0).unwrap(), 2);
    assert_eq!(a.dim(-1).unwrap(), 4);
    assert_eq!(a.dim(-3).unwrap(), 2);
    expect_err(a.dim(3), "dim");
    expect_err(a.dim(-4), "dim");
}

#[test]
fn from_slice_rejects_bad_shapes() {
    let e = expect_err(Array::from_slice(&[1.0f32, 2.0, 3.0], &[2, 2]), "array_from_slice");
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    let e = expect_err(Array::from_slice(&[1.0f32, 2.0], &[-1, -2]), "array_from_slice");
    assert!(e.to_string().contains("negative"), "{e}");
    expect_err(Array::from_slice(&[1.0f32, 2.0], &[]), "array_from_slice");
    expect_err(Array::from_slice::<f32>(&[], &[i32::MAX, i32::MAX, i32::MAX]), "array_from_slice");
}

#[test]
fn to_vec_with_the_wrong_type_is_a_dtype_mismatch() {
    let a = arr(&[1.0, 2.0], &[2]);
    match a.to_vec::<i32>() {
        Err(Error::DtypeMismatch { op, expected, got }) => {
            assert_eq!(op, "array_to_vec");
            assert_eq!(expected, Dtype::Int32);
            assert_eq!(got, Dtype::Float32);
        }
        other => panic!("expected a dtype mismatch, got {other:?}"),
    }
    let e = a.to_vec::<f64>().unwrap_err();
    assert_eq!(e.op(), "array_to_vec");
    assert!(e.to_string().contains("float64") && e.to_string().contains("float32"), "{e}");
    // item goes through to_vec and reports the same.
    assert!(matches!(Array::scalar(1u8).item::<i8>(), Err(Error::DtypeMismatch { .. })));
}

#[test]
fn item_needs_exactly_one_element() {
    expect_err(arr(&[1.0, 2.0], &[2]).item::<f32>(), "item");
    expect_err(Array::from_slice::<f32>(&[], &[0]).unwrap().item::<f32>(), "item");
}

#[test]
fn to_vec_f32_converts_ints_and_halves() {
    assert_eq!(Array::from_vec(&[1i32, -2, 3]).unwrap().to_vec_f32().unwrap(), vec![1.0, -2.0, 3.0]);
    let h = Array::from_vec(&[bf16::from_f32(0.5), bf16::from_f32(-8.0)]).unwrap();
    assert_eq!(h.to_vec_f32().unwrap(), vec![0.5, -8.0]);
    let b = Array::from_vec(&[true, false]).unwrap();
    assert_eq!(b.to_vec_f32().unwrap(), vec![1.0, 0.0]);
}

#[test]
fn empty_arrays() {
    let e = Array::from_slice::<f32>(&[], &[0]).unwrap();
    assert_eq!(e.shape(), vec![0]);
    assert_eq!(e.size(), 0);
    assert_eq!(e.nbytes(), 0);
    assert_eq!(e.to_vec::<f32>().unwrap(), Vec::<f32>::new());
    e.eval().unwrap();

    let e = Array::from_slice::<i32>(&[], &[2, 0]).unwrap();
    assert_eq!(e.shape(), vec![2, 0]);
    assert_eq!(e.to_vec::<i32>().unwrap(), Vec::<i32>::new());
    // A computed empty array reads back empty too.
    let t = ops::transpose(&ops::add_scalar(&e, 1.0).unwrap(), &[1, 0]).unwrap();
    assert_eq!(t.shape(), vec![0, 2]);
    assert_eq!(t.to_vec::<i32>().unwrap(), Vec::<i32>::new());
}

#[test]
fn clones_share_and_outlive_the_original() {
    let a = arr(&[1.0, 2.0, 3.0], &[3]);
    let b = a.clone();
    drop(a);
    assert_eq!(vals(&b), vec![1.0, 2.0, 3.0]);
    let text = format!("{b:?}");
    assert!(text.contains("[3]") && text.contains("Float32"), "{text}");
}

#[test]
fn contiguity_and_strides() {
    let a = iota(&[2, 3]);
    a.eval().unwrap();
    assert!(a.is_row_contiguous());
    assert_eq!(a.strides().unwrap(), vec![3, 1]);

    let t = ops::transpose(&a, &[1, 0]).unwrap();
    assert_eq!(t.strides().unwrap(), vec![1, 3]);
    assert!(!t.is_row_contiguous());
    assert_eq!(vals(&t), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);

    let b = ops::broadcast_to(&arr(&[1.0, 2.0, 3.0], &[1, 3]), &[4, 3]).unwrap();
    assert_eq!(b.strides().unwrap(), vec![0, 1]);
    assert_eq!(vals(&b), [1.0, 2.0, 3.0].repeat(4));

    let c = ops::contiguous(&t).unwrap();
    c.eval().unwrap();
    assert!(c.is_row_contiguous());
    assert_eq!(vals(&c), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
}

#[test]
fn reads_of_offset_views_start_at_the_offset() {
    let a = iota(&[4, 3]);
    // Rows 1..3 are contiguous but start three elements in.
    let s = ops::slice(&a, &[1, 0], &[3, 3]).unwrap();
    assert_eq!(vals(&s), vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    // Column 2: one element per row.
    let c = ops::slice(&a, &[0, 2], &[4, 3]).unwrap();
    assert_eq!(vals(&c), vec![2.0, 5.0, 8.0, 11.0]);
}

#[test]
fn dtype_names_and_parsing() {
    for d in Dtype::ALL {
        assert_eq!(Dtype::parse(d.name()), Some(d));
        assert_eq!(d.to_string(), d.name());
    }
    for (s, d) in [("BF16", Dtype::Bfloat16), ("F16", Dtype::Float16), ("BOOL", Dtype::Bool), ("I64", Dtype::Int64)] {
        assert_eq!(Dtype::parse(s), Some(d));
    }
    assert_eq!(Dtype::parse("F8_E4M3"), None);
    assert_eq!(Dtype::Bfloat16.size_of(), 2);
    assert_eq!(Dtype::Complex64.size_of(), 8);
    assert!(Dtype::Bfloat16.is_float() && !Dtype::Bfloat16.is_integer());
    assert!(Dtype::Uint8.is_integer() && !Dtype::Bool.is_integer() && !Dtype::Complex64.is_float());
}

#[test]
fn arrays_made_and_evaluated_on_another_thread() {
    let handles: Vec<_> = (0..2)
        .map(|t| {
            std::thread::spawn(move || {
                let a = arr(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
                let b = ops::multiply_scalar(&ops::matmul(&a, &a).unwrap(), f64::from(t + 1)).unwrap();
                b.eval().unwrap();
                vals(&b)
            })
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        let k = (t + 1) as f32;
        assert_eq!(h.join().unwrap(), vec![7.0 * k, 10.0 * k, 15.0 * k, 22.0 * k]);
    }
    // The main thread still works afterwards.
    assert_eq!(vals(&ops::add_scalar(&arr(&[1.0], &[1]), 1.0).unwrap()), vec![2.0]);
}
