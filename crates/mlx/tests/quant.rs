// SPDX-License-Identifier: EUPL-1.2
//! Affine quantisation: quantize/dequantize (checked by unpacking the words
//! by hand), quantized_matmul, gather_mm and gather_qmm, with their errors.

mod common;

use common::{arr, assert_close, data, expect_err, iarr, matmul_ref, vals, wide};
use mlx::ops::{self, Quantized};
use mlx::{Array, Dtype, Error};

fn weights(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Array) {
    let d = data(rows * cols, seed);
    let a = arr(&d, &[rows as i32, cols as i32]);
    (d, a)
}

/// Unpacks `bits`-bit values (bits dividing 32) from little-endian words.
fn unpack(words: &[u32], bits: u32, count: usize) -> Vec<u32> {
    let per = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    (0..count).map(|i| (words[i / per] >> ((i % per) as u32 * bits)) & mask).collect()
}

/// Every dequantised element is within one quantisation step of the
/// original, a step being the group's range over `2^bits - 1`. (MLX puts
/// zero exactly on the grid, which stretches the step and can clip the far
/// end of the range, so half a step is not guaranteed.)
#[track_caller]
fn assert_within_a_step(original: &[f32], deq: &[f64], group: usize, bits: u32) {
    for (g, (xs, ys)) in original.chunks(group).zip(deq.chunks(group)).enumerate() {
        let hi = xs.iter().cloned().fold(f32::MIN, f32::max);
        let lo = xs.iter().cloned().fold(f32::MAX, f32::min);
        let step = f64::from(hi - lo) / f64::from((1u32 << bits) - 1);
        for (i, (&x, &y)) in xs.iter().zip(ys).enumerate() {
            assert!(
                (f64::from(x) - y).abs() <= step + 1e-5,
                "bits {bits} group {group}: element {} is {y}, originally {x} (step {step})",
                g * group + i
            );
        }
    }
}

#[test]
fn quantize_shapes_and_hand_dequantisation() {
    let (rows, cols, group) = (4usize, 128usize, 32usize);
    let (d, w) = weights(rows, cols, 1);
    for bits in [2u32, 4, 8] {
        let q = ops::quantize(&w, group as i32, bits as i32).unwrap();
        assert_eq!(q.weight.dtype(), Dtype::Uint32);
        assert_eq!(q.weight.shape(), vec![rows as i32, (cols * bits as usize / 32) as i32]);
        assert_eq!(q.scales.shape(), vec![rows as i32, (cols / group) as i32]);
        let biases = q.biases.as_ref().expect("affine mode has biases");
        assert_eq!(biases.shape(), q.scales.shape());
        assert_eq!((q.group_size, q.bits), (group as i32, bits as i32));

        let words = q.weight.to_vec::<u32>().unwrap();
        let scales = vals(&q.scales);
        let bs = vals(biases);
        let codes = unpack(&words, bits, rows * cols);
        let by_hand: Vec<f64> = (0..rows * cols)
            .map(|i| {
                let g = i / group;
                f64::from(scales[g]) * f64::from(codes[i]) + f64::from(bs[g])
            })
            .collect();
        let deq = ops::dequantize(&q, None).unwrap();
        assert_eq!(deq.shape(), vec![rows as i32, cols as i32]);
        assert_eq!(deq.dtype(), Dtype::Float32);
        assert_close(&vals(&deq), &by_hand, 1e-6);

        assert_within_a_step(&d, &by_hand, group, bits);
    }
}

#[test]
fn quantize_round_trips_for_every_bit_width() {
    let (d, w) = weights(2, 256, 2);
    for bits in [2, 3, 4, 5, 6, 8] {
        for group in [32, 64, 128] {
            let q = ops::quantize(&w, group, bits).unwrap();
            let deq = vals(&ops::dequantize(&q, None).unwrap());
            assert_within_a_step(&d, &wide(&deq), group as usize, bits as u32);
        }
    }
}

#[test]
fn dequantize_to_another_dtype() {
    let (_, w) = weights(2, 64, 3);
    let q = ops::quantize(&ops::astype(&w, Dtype::Bfloat16).unwrap(), 64, 4).unwrap();
    assert_eq!(q.scales.dtype(), Dtype::Bfloat16);
    assert_eq!(ops::dequantize(&q, None).unwrap().dtype(), Dtype::Bfloat16);
    let f = ops::dequantize(&q, Some(Dtype::Float32)).unwrap();
    assert_eq!(f.dtype(), Dtype::Float32);
}

#[test]
fn quantized_matmul_matches_dense_on_dequantised_weights() {
    let (out_f, in_f) = (8usize, 128usize);
    let (_, w) = weights(out_f, in_f, 4);
    let x_d = data(3 * in_f, 5);
    let x = arr(&x_d, &[3, in_f as i32]);
    for bits in [4, 8] {
        let q = ops::quantize(&w, 64, bits).unwrap();
        let deq = vals(&ops::dequantize(&q, None).unwrap());
        // x @ deqᵀ in f64.
        let deq_t = common::permute_ref(&wide(&deq), &[out_f, in_f], &[1, 0]);
        let want = matmul_ref(&wide(&x_d), &deq_t, 3, in_f, out_f);
        let y = ops::quantized_matmul(&x, &q, true).unwrap();
        assert_eq!(y.shape(), vec![3, out_f as i32]);
        assert_close(&vals(&y), &want, 1e-4);
        // Without the transpose, w is [in, out].
        let (_, w2) = weights(in_f, 64, 6);
        let q2 = ops::quantize(&w2, 64, bits).unwrap();
        let deq2 = vals(&ops::dequantize(&q2, None).unwrap());
        let y2 = ops::quantized_matmul(&x, &q2, false).unwrap();
        assert_eq!(y2.shape(), vec![3, 64]);
        assert_close(&vals(&y2), &matmul_ref(&wide(&x_d), &wide(&deq2), 3, in_f, 64), 1e-4);
    }
}

#[test]
fn quantisation_errors() {
    let (_, w) = weights(4, 128, 7);
    let e = expect_err(ops::quantize(&w, 16, 4), "quantize");
    assert!(matches!(e, Error::InvalidArgument { .. }));
    expect_err(ops::quantize(&w, 48, 4), "quantize");
    expect_err(ops::quantize(&w, 64, 7), "quantize");
    expect_err(ops::quantize(&w, 64, 1), "quantize");
    // Last dimension not a multiple of the group size.
    let (_, odd) = weights(4, 96, 8);
    let e = expect_err(ops::quantize(&odd, 64, 4), "quantize");
    assert!(matches!(e, Error::Mlx { .. }), "{e:?}");
    expect_err(ops::quantize(&arr(&data(64, 1), &[64]), 64, 4), "quantize");
    expect_err(ops::quantize(&iarr(&[1; 128], &[2, 64]), 64, 4), "quantize");

    let q = ops::quantize(&w, 64, 4).unwrap();
    // x's inner dimension must match.
    expect_err(ops::quantized_matmul(&arr(&data(64, 9), &[1, 64]), &q, true), "quantized_matmul");
    // Parameters that disagree with the packed shapes.
    let wrong = Quantized { group_size: 32, ..q.clone() };
    expect_err(ops::dequantize(&wrong, None), "dequantize");
    expect_err(ops::quantized_matmul(&arr(&data(128, 9), &[1, 128]), &wrong, true), "quantized_matmul");
    let bad_bits = Quantized { bits: 9, ..q.clone() };
    expect_err(ops::dequantize(&bad_bits, None), "dequantize");
    let no_scales = Quantized { scales: arr(&[1.0], &[1, 1]), ..q.clone() };
    expect_err(ops::dequantize(&no_scales, None), "dequantize");
}

#[test]
fn gather_mm_picks_matrices_by_index() {
    let (m, k, n) = (2usize, 3usize, 4usize);
    let a_d = data(3 * m * k, 11);
    let b_d = data(2 * k * n, 12);
    let a = arr(&a_d, &[3, m as i32, k as i32]);
    let b = arr(&b_d, &[2, k as i32, n as i32]);
    let lhs = Array::from_vec(&[2u32, 0, 1]).unwrap();
    let rhs = Array::from_vec(&[1u32, 1, 0]).unwrap();
    let out = ops::gather_mm(&a, &b, Some(&lhs), Some(&rhs), false).unwrap();
    assert_eq!(out.shape(), vec![3, m as i32, n as i32]);
    let mut want = Vec::new();
    for (&l, &r) in [2usize, 0, 1].iter().zip(&[1usize, 1, 0]) {
        let am = wide(&a_d[l * m * k..(l + 1) * m * k]);
        let bm = wide(&b_d[r * k * n..(r + 1) * k * n]);
        want.extend(matmul_ref(&am, &bm, m, k, n));
    }
    assert_close(&vals(&out), &want, 1e-5);

    // Only rhs indices: every lhs batch (broadcast) against its picked rhs.
    let x = arr(&a_d[..m * k], &[1, m as i32, k as i32]);
    let out = ops::gather_mm(&x, &b, None, Some(&iarr(&[1], &[1])), true).unwrap();
    let bm = wide(&b_d[k * n..]);
    assert_close(&vals(&out), &matmul_ref(&wide(&a_d[..m * k]), &bm, m, k, n), 1e-5);
    // Without indices it is a plain matmul.
    let plain = ops::gather_mm(&x, &arr(&b_d[..k * n], &[k as i32, n as i32]), None, None, false).unwrap();
    assert_close(
        &vals(&plain),
        &matmul_ref(&wide(&a_d[..m * k]), &wide(&b_d[..k * n]), m, k, n),
        common::matmul_tol(1e-5),
    );

    // Indices outside the batch are clamped by the shim, never read outside b.
    let out = ops::gather_mm(&x, &b, None, Some(&iarr(&[7], &[1])), false).unwrap();
    assert_close(&vals(&out), &matmul_ref(&wide(&a_d[..m * k]), &bm, m, k, n), 1e-5);

    expect_err(ops::gather_mm(&a, &b, Some(&arr(&[0.0], &[1])), None, false), "gather_mm");
    expect_err(ops::gather_mm(&a, &arr(&data(8, 1), &[2, 4, 1]), Some(&lhs), None, false), "gather_mm");
    expect_err(ops::gather_mm(&a, &b, Some(&iarr(&[0, 1], &[2])), Some(&iarr(&[0, 1, 1], &[3])), false), "gather_mm");
}

#[test]
fn gather_qmm_matches_gather_mm_on_dequantised_experts() {
    // Three experts of [out=8, in=64]; tokens routed to experts 2, 0, 2.
    let (experts, out_f, in_f) = (3usize, 8usize, 64usize);
    let (_, w) = weights(experts * out_f, in_f, 13);
    let w = ops::reshape(&w, &[experts as i32, out_f as i32, in_f as i32]).unwrap();
    let q = ops::quantize(&w, 32, 4).unwrap();
    assert_eq!(q.weight.shape(), vec![3, 8, 8]);
    let deq = ops::dequantize(&q, None).unwrap();
    let x = arr(&data(3 * in_f, 14), &[3, 1, in_f as i32]);
    let idx = Array::from_vec(&[2u32, 0, 2]).unwrap();
    let lhs = Array::from_vec(&[0u32, 1, 2]).unwrap();
    let got = ops::gather_qmm(&x, &q, Some(&lhs), Some(&idx), true, false).unwrap();
    assert_eq!(got.shape(), vec![3, 1, out_f as i32]);
    let deq_t = ops::swapaxes(&deq, -1, -2).unwrap();
    let want = ops::gather_mm(&x, &deq_t, Some(&lhs), Some(&idx), false).unwrap();
    assert_close(&vals(&got), &common::wide(&vals(&want)), 1e-4);
    // Out-of-range expert indices are clamped to the last expert.
    let far =
        ops::gather_qmm(&x, &q, Some(&lhs), Some(&Array::from_vec(&[2u32, 99, 2]).unwrap()), true, false).unwrap();
    let last =
        ops::gather_qmm(&x, &q, Some(&lhs), Some(&Array::from_vec(&[2u32, 2, 2]).unwrap()), true, false).unwrap();
    assert_eq!(vals(&far), vals(&last));

    expect_err(ops::gather_qmm(&x, &q, None, Some(&arr(&[0.0], &[1])), true, false), "gather_qmm");
    expect_err(ops::gather_qmm(&arr(&data(32, 1), &[1, 1, 32]), &q, None, Some(&idx), true, false), "gather_qmm");
    let bad = Quantized { group_size: 16, ..q.clone() };
    expect_err(ops::gather_qmm(&x, &bad, None, Some(&idx), true, false), "gather_qmm");
}

/// A quantised KV cache's keys and values: a slice of a bigger buffer along the positions, with
/// a batch and head axis, the query rows folded over it (`transpose`) and the scores back
/// (`!transpose`). MLX's CUDA kernels take only operands contiguous as a whole, which such a slice
/// is not, and have only a naive kernel for 8 or more rows over the batch (`mlxs_quantized_matmul`
/// dequantises the slice there); everywhere the products must equal the dense ones on the
/// dequantised slice: 2 heads of 3 rows, and 4 of 4 (16 rows over the batch).
#[test]
fn quantized_matmul_takes_a_sliced_batched_cache() {
    for (heads, rows) in [(2i32, 3i32), (4, 4)] {
        sliced_cache_products(heads, rows);
    }
}

fn sliced_cache_products(heads: i32, rows: i32) {
    let (cap, used, d) = (40i32, 33i32, 128i32);
    let buffer = arr(&data((heads * cap * d) as usize, 7), &[1, heads, cap, d]);
    let q_rows = arr(&data((heads * rows * d) as usize, 8), &[1, heads, rows, d]);
    for bits in [4, 8] {
        let q = ops::quantize(&buffer, 64, bits).unwrap();
        let cut = |a: &Array| ops::slice_axis(a, 2, 0, used).unwrap();
        let sliced = Quantized {
            weight: cut(&q.weight),
            scales: cut(&q.scales),
            biases: q.biases.as_ref().map(cut),
            group_size: q.group_size,
            bits: q.bits,
        };
        let dense = ops::dequantize(&sliced, None).unwrap();
        let scores = ops::quantized_matmul(&q_rows, &sliced, true).unwrap();
        assert_eq!(scores.shape(), vec![1, heads, rows, used]);
        let want = ops::matmul(&q_rows, &ops::swapaxes(&dense, -1, -2).unwrap()).unwrap();
        assert_close(&vals(&scores), &wide(&vals(&want)), 1e-4);
        let out = ops::quantized_matmul(&scores, &sliced, false).unwrap();
        assert_eq!(out.shape(), vec![1, heads, rows, d]);
        let want = ops::matmul(&scores, &dense).unwrap();
        assert_close(&vals(&out), &wide(&vals(&want)), 1e-4);
    }
}
