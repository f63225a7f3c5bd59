// SPDX-License-Identifier: EUPL-1.2
//! Property tests of shape algebra (reshape, transpose, concatenate/split,
//! slice/slice_update round trips) and of reading non-contiguous views
//! (transposes, broadcasts, strided and reversed slices, as_strided) against
//! CPU-side references. Shapes have up to four dimensions and 64 elements.

mod common;

use common::{broadcast_ref, permute_ref, row_strides, unravel};
use mlx::{Array, Dtype, ops};
use proptest::prelude::*;

const MAX_ELEMS: usize = 64;

fn config() -> ProptestConfig {
    ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() }
}

/// Shapes of 0–4 dimensions, each 0–4 (so empty arrays appear), at most 64 elements.
fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..=4, 0..=4)
        .prop_filter("at most 64 elements", |s| s.iter().product::<usize>() <= MAX_ELEMS)
}

/// Shapes with no zero dimension.
fn nonempty_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=4, 1..=4)
        .prop_filter("at most 64 elements", |s| s.iter().product::<usize>() <= MAX_ELEMS)
}

fn i32s(xs: &[usize]) -> Vec<i32> {
    xs.iter().map(|&x| x as i32).collect()
}

/// Distinct values 0, 1, 2, ... so that any misplaced element shows.
fn seq_array(shape: &[usize]) -> (Vec<f32>, Array) {
    let n: usize = shape.iter().product();
    let d: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let a = Array::from_slice(&d, &i32s(shape)).unwrap();
    (d, a)
}

fn read(a: &Array) -> Vec<f32> {
    a.to_vec::<f32>().unwrap()
}

/// A random factorisation of `n` into up to four dimensions.
fn factorisation(n: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=8, 0..=3).prop_map(move |cands| {
        if n == 0 {
            return vec![0, cands.first().copied().unwrap_or(1)];
        }
        let mut rest = n;
        let mut dims = Vec::new();
        for c in cands {
            if rest.is_multiple_of(c) {
                dims.push(c);
                rest /= c;
            }
        }
        dims.push(rest);
        dims
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn reshape_round_trips((shape, other) in shape().prop_flat_map(|s| {
        let n = s.iter().product();
        (Just(s), factorisation(n))
    })) {
        let (d, a) = seq_array(&shape);
        let r = ops::reshape(&a, &i32s(&other)).unwrap();
        prop_assert_eq!(r.shape(), i32s(&other));
        prop_assert_eq!(read(&r), d.clone());
        let back = ops::reshape(&r, &i32s(&shape)).unwrap();
        prop_assert_eq!(back.shape(), i32s(&shape));
        prop_assert_eq!(read(&back), d);
    }

    #[test]
    fn transpose_then_inverse_is_identity((shape, perm) in shape().prop_flat_map(|s| {
        let n = s.len();
        (Just(s), Just((0..n).collect::<Vec<usize>>()).prop_shuffle())
    })) {
        let (d, a) = seq_array(&shape);
        let t = ops::transpose(&a, &i32s(&perm)).unwrap();
        let t_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        prop_assert_eq!(t.shape(), i32s(&t_shape));
        // The transposed view reads like the CPU permutation.
        prop_assert_eq!(read(&t), permute_ref(&d, &shape, &perm));
        let mut inverse = vec![0usize; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        let back = ops::transpose(&t, &i32s(&inverse)).unwrap();
        prop_assert_eq!(back.shape(), i32s(&shape));
        prop_assert_eq!(read(&back), d);
    }

    #[test]
    fn concatenate_then_split_gives_the_parts((base, axis, sizes) in nonempty_shape().prop_flat_map(|s| {
        let n = s.len();
        (Just(s), 0..n, prop::collection::vec(0usize..=3, 1..=4))
    })) {
        let mut parts = Vec::new();
        let mut datas = Vec::new();
        let mut offset = 0.0f32;
        for &sz in &sizes {
            let mut sh = base.clone();
            sh[axis] = sz;
            let n: usize = sh.iter().product();
            let d: Vec<f32> = (0..n).map(|i| offset + i as f32).collect();
            offset += 1000.0;
            parts.push(Array::from_slice(&d, &i32s(&sh)).unwrap());
            datas.push(d);
        }
        let refs: Vec<&Array> = parts.iter().collect();
        let c = ops::concatenate(&refs, axis as i32).unwrap();
        let total: usize = sizes.iter().sum();
        prop_assert_eq!(c.dim(axis as i32).unwrap() as usize, total);
        let mut cuts = Vec::new();
        let mut acc = 0;
        for &sz in &sizes[..sizes.len() - 1] {
            acc += sz;
            cuts.push(acc as i32);
        }
        let split = ops::split_at(&c, &cuts, axis as i32).unwrap();
        prop_assert_eq!(split.len(), sizes.len());
        for (i, (p, d)) in split.iter().zip(&datas).enumerate() {
            prop_assert_eq!(p.shape(), parts[i].shape());
            prop_assert_eq!(&read(p), d);
        }
    }

    #[test]
    fn slice_then_slice_update_restores_the_region((shape, bounds) in nonempty_shape().prop_flat_map(|s| {
        let b: Vec<_> = s.iter().map(|&n| (0..=n, 0..=n)).collect();
        (Just(s), b)
    })) {
        let (d, a) = seq_array(&shape);
        let start: Vec<usize> = bounds.iter().map(|&(x, y)| x.min(y)).collect();
        let stop: Vec<usize> = bounds.iter().map(|&(x, y)| x.max(y)).collect();
        let s = ops::slice(&a, &i32s(&start), &i32s(&stop)).unwrap();
        let region: Vec<usize> = start.iter().zip(&stop).map(|(a, b)| b - a).collect();
        prop_assert_eq!(s.shape(), i32s(&region));
        let z = ops::zeros(&i32s(&shape), Dtype::Float32).unwrap();
        let u = ops::slice_update(&z, &s, &i32s(&start), &i32s(&stop)).unwrap();
        let want: Vec<f32> = (0..d.len())
            .map(|flat| {
                let idx = unravel(flat, &shape);
                let inside = idx.iter().zip(&start).zip(&stop).all(|((&i, &lo), &hi)| i >= lo && i < hi);
                if inside { d[flat] } else { 0.0 }
            })
            .collect();
        prop_assert_eq!(read(&u), want);
    }

    #[test]
    fn broadcast_views_read_logically((shape, lead, expand) in nonempty_shape().prop_flat_map(|s| {
        let n = s.len();
        (Just(s), 0usize..=2, prop::collection::vec(1usize..=3, n))
    })) {
        // Dimensions of size 1 are stretched to `expand[i]`, plus `lead` new axes of size 2.
        let ones: Vec<usize> = shape.iter().map(|&n| if n == 2 { 1 } else { n }).collect();
        let (d, a) = seq_array(&ones);
        let mut out: Vec<usize> = vec![2; lead];
        out.extend(ones.iter().zip(&expand).map(|(&n, &e)| if n == 1 { e } else { n }));
        prop_assume!(out.iter().product::<usize>() <= 4 * MAX_ELEMS);
        let b = ops::broadcast_to(&a, &i32s(&out)).unwrap();
        let want = broadcast_ref(&d, &ones, &out);
        prop_assert_eq!(read(&b), want.clone());
        // A transpose of the broadcast reads like the CPU permutation of it.
        let perm: Vec<usize> = (0..out.len()).rev().collect();
        let t = ops::transpose(&b, &i32s(&perm)).unwrap();
        prop_assert_eq!(read(&t), permute_ref(&want, &out, &perm));
    }

    #[test]
    fn strided_slices_read_logically((shape, spec) in nonempty_shape().prop_flat_map(|s| {
        let specs: Vec<_> = s.iter().map(|&n| (0..n, 1usize..=3, any::<bool>())).collect();
        (Just(s), specs)
    })) {
        let (d, a) = seq_array(&shape);
        let mut start = Vec::new();
        let mut stop = Vec::new();
        let mut step = Vec::new();
        // Per axis, the indices the slice should visit.
        let mut visits: Vec<Vec<usize>> = Vec::new();
        for (&n, &(s0, st, reverse)) in shape.iter().zip(&spec) {
            if reverse {
                // From s0 down to the beginning: stop -(n + 1) is "before 0".
                start.push(s0 as i32);
                stop.push(-(n as i32) - 1);
                step.push(-(st as i32));
                visits.push((0..=s0).rev().step_by(st).collect());
            } else {
                start.push(s0 as i32);
                stop.push(n as i32);
                step.push(st as i32);
                visits.push((s0..n).step_by(st).collect());
            }
        }
        let s = ops::slice_strided(&a, &start, &stop, &step).unwrap();
        let out_shape: Vec<usize> = visits.iter().map(Vec::len).collect();
        prop_assert_eq!(s.shape(), i32s(&out_shape));
        let st = row_strides(&shape);
        let n: usize = out_shape.iter().product();
        let want: Vec<f32> = (0..n)
            .map(|flat| {
                let idx = unravel(flat, &out_shape);
                d[idx.iter().enumerate().map(|(ax, &i)| visits[ax][i] * st[ax]).sum::<usize>()]
            })
            .collect();
        prop_assert_eq!(read(&s), want);
    }

    #[test]
    fn as_strided_views_read_logically((len, dims, strides, offset) in (1usize..=MAX_ELEMS).prop_flat_map(|len| {
        (Just(len), prop::collection::vec(1usize..=4, 1..=3), prop::collection::vec(-3i64..=3, 3), 0..len)
    })) {
        let strides = &strides[..dims.len()];
        let (d, a) = seq_array(&[len]);
        let r = ops::as_strided(&a, &i32s(&dims), strides, offset);
        // Work out where every element of the view points.
        let n: usize = dims.iter().product();
        let positions: Vec<i64> = (0..n)
            .map(|flat| {
                let idx = unravel(flat, &dims);
                offset as i64 + idx.iter().zip(strides).map(|(&i, &s)| i as i64 * s).sum::<i64>()
            })
            .collect();
        if positions.iter().all(|&p| p >= 0 && (p as usize) < len) {
            let v = r.unwrap();
            prop_assert_eq!(read(&v), positions.iter().map(|&p| d[p as usize]).collect::<Vec<_>>());
        } else {
            // The shim refuses views reaching outside the buffer.
            prop_assert_eq!(r.unwrap_err().op(), "as_strided");
        }
    }

    #[test]
    fn gathers_never_leave_the_array((shape, axis, idx) in nonempty_shape().prop_flat_map(|s| {
        let n = s.len();
        (Just(s), 0..n, prop::collection::vec(-100i32..100, 0..=6))
    })) {
        // Whatever the indices, take reads inside the array: a negative index
        // counts from the end once, anything still outside is clamped.
        let (d, a) = seq_array(&shape);
        let n = shape[axis] as i32;
        let clamp = |i: i32| (if i < 0 { i + n } else { i }).clamp(0, n - 1) as usize;
        let ia = Array::from_slice(&idx, &[idx.len() as i32]).unwrap();
        let t = ops::take(&a, &ia, axis as i32).unwrap();
        let mut out_shape = shape.clone();
        out_shape[axis] = idx.len();
        prop_assert_eq!(t.shape(), i32s(&out_shape));
        let st = row_strides(&shape);
        let total: usize = out_shape.iter().product();
        let want: Vec<f32> = (0..total)
            .map(|flat| {
                let mut ix = unravel(flat, &out_shape);
                ix[axis] = clamp(idx[ix[axis]]);
                d[ix.iter().zip(&st).map(|(i, s)| i * s).sum::<usize>()]
            })
            .collect();
        prop_assert_eq!(read(&t), want);
        let flat = ops::take_flat(&a, &ia).unwrap();
        let len = d.len() as i32;
        let want: Vec<f32> =
            idx.iter().map(|&i| d[(if i < 0 { i + len } else { i }).clamp(0, len - 1) as usize]).collect();
        prop_assert_eq!(read(&flat), want);
    }

    #[test]
    fn bad_axes_and_shapes_are_errors_not_aborts((shape, axis, target) in shape().prop_flat_map(|s| {
        (Just(s), -6i32..6, prop::collection::vec(-2i32..6, 0..=4))
    })) {
        // Every op either succeeds (and then evaluates) or fails with an
        // error naming it; nothing panics or aborts.
        let (_, a) = seq_array(&shape);
        let results: Vec<(&str, mlx::Result<Array>)> = vec![
            ("sum", ops::sum(&a, &[axis], false)),
            ("argmax", ops::argmax(&a, axis, false)),
            ("softmax", ops::softmax(&a, &[axis], false)),
            ("cumsum", ops::cumsum(&a, axis, false, true)),
            ("sort", ops::sort(&a, axis)),
            ("topk", ops::topk(&a, 1, axis)),
            ("expand_dims", ops::expand_dims(&a, &[axis])),
            ("squeeze", ops::squeeze(&a, &[axis])),
            ("reshape", ops::reshape(&a, &target)),
            ("broadcast_to", ops::broadcast_to(&a, &target)),
            ("concatenate", ops::concatenate(&[&a, &a], axis)),
            ("split", ops::split(&a, 2, axis).map(|v| v.into_iter().next().unwrap_or_else(|| a.clone()))),
            ("flatten", ops::flatten(&a, axis, -1)),
            ("repeat", ops::repeat(&a, 2, axis)),
        ];
        for (op, r) in results {
            match r {
                Ok(x) => prop_assert!(x.eval().is_ok(), "{op} built an array that does not evaluate"),
                Err(e) => {
                    prop_assert_eq!(e.op(), op);
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}
