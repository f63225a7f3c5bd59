// SPDX-License-Identifier: EUPL-1.2
//! Layer helpers: dense and quantised Linear and Embedding, activations
//! against float64 formulas, and repeat_kv.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use common::{arr, assert_close, data, expect_err, iarr, iota, matmul_ref, permute_ref, vals, wide};
use mlx::{Dtype, ops};
use mlx_metal::nn::{self, Embedding, Linear, LinearWeight};

const IN: usize = 128;
const OUT: usize = 6;

#[test]
fn dense_linear_matches_f64() {
    let w = data(OUT * IN, 1);
    let b = data(OUT, 2);
    let x = data(3 * IN, 3);
    let lin = Linear::dense(arr(&w, &[OUT as i32, IN as i32]), Some(arr(&b, &[OUT as i32]))).unwrap();
    assert_eq!(lin.features().unwrap(), (OUT as i32, IN as i32));
    let y = lin.forward(&arr(&x, &[3, IN as i32])).unwrap();
    assert_eq!(y.shape(), vec![3, OUT as i32]);
    let wt = permute_ref(&wide(&w), &[OUT, IN], &[1, 0]);
    let want: Vec<f64> =
        matmul_ref(&wide(&x), &wt, 3, IN, OUT).iter().enumerate().map(|(i, v)| v + f64::from(b[i % OUT])).collect();
    assert_close(&vals(&y), &want, common::matmul_tol(1e-5));
    // Leading batch axes pass through.
    let y3 = lin.forward(&arr(&x, &[3, 1, IN as i32])).unwrap();
    assert_eq!(y3.shape(), vec![3, 1, OUT as i32]);
    assert_close(&vals(&y3), &want, common::matmul_tol(1e-5));

    expect_err(Linear::dense(arr(&w, &[OUT as i32 * IN as i32]), None), "linear");
    // An input of the wrong width fails in the product (matmul or addmm,
    // depending on how the layer folds its bias in).
    let e = lin.forward(&arr(&x[..IN - 1], &[1, IN as i32 - 1])).unwrap_err();
    assert!(["matmul", "addmm"].contains(&e.op()), "{e}");
}

#[test]
fn quantised_linear_is_close_to_dense() {
    let w = data(OUT * IN, 4);
    let x = data(2 * IN, 5);
    let wa = arr(&w, &[OUT as i32, IN as i32]);
    let xa = arr(&x, &[2, IN as i32]);
    let dense = Linear::dense(wa.clone(), None).unwrap();
    let yd = vals(&dense.forward(&xa).unwrap());
    for bits in [4, 8] {
        let q = ops::quantize(&wa, 64, bits).unwrap();
        let lin = Linear::quantized(q.clone(), None);
        assert_eq!(lin.features().unwrap(), (OUT as i32, IN as i32));
        let yq = vals(&lin.forward(&xa).unwrap());
        // Exactly the dense layer over the dequantised weights ...
        let deq = Linear::dense(lin.dense_weight(None).unwrap(), None).unwrap();
        assert_close(&yq, &wide(&vals(&deq.forward(&xa).unwrap())), common::matmul_tol(1e-4));
        // ... and close to the original dense layer. Each weight moves by up
        // to a step of 2 / (2^bits - 1), randomly, so over 128 inputs the
        // relative error of the outputs is about 13 % at 4 bits and 1 % at 8.
        let diff: f64 = yq.iter().zip(&yd).map(|(&a, &b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = yd.iter().map(|&b| f64::from(b).powi(2)).sum::<f64>().sqrt();
        let tol = if bits == 4 { 0.25 } else { 0.02 };
        assert!(diff / norm < tol, "bits {bits}: relative error {}", diff / norm);
        // With a bias.
        let bias = arr(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[OUT as i32]);
        let lb = Linear::quantized(q, Some(bias));
        let yb = vals(&lb.forward(&xa).unwrap());
        let want: Vec<f64> = yq.iter().enumerate().map(|(i, &v)| f64::from(v) + (i % OUT + 1) as f64).collect();
        assert_close(&yb, &want, 1e-5);
    }
    // dense_weight converts dtypes on request.
    let d16 = dense.dense_weight(Some(Dtype::Bfloat16)).unwrap();
    assert_eq!(d16.dtype(), Dtype::Bfloat16);
    assert_eq!(dense.dense_weight(None).unwrap().dtype(), Dtype::Float32);
}

#[test]
fn quantised_embedding_equals_the_dequantised_gather() {
    let (vocab, dim) = (10usize, 64usize);
    let table = arr(&data(vocab * dim, 6), &[vocab as i32, dim as i32]);
    let q = ops::quantize(&table, 32, 4).unwrap();
    let deq = ops::dequantize(&q, None).unwrap();
    let emb = Embedding::new(LinearWeight::Quantized(q));
    let ids = iarr(&[3, 0, 9, 3, 7, 1], &[2, 3]);
    let got = emb.forward(&ids).unwrap();
    assert_eq!(got.shape(), vec![2, 3, dim as i32]);
    let want = ops::take(&deq, &ids, 0).unwrap();
    assert_eq!(vals(&got), vals(&want));

    let dense = Embedding::new(LinearWeight::Dense(table.clone()));
    let got = dense.forward(&ids).unwrap();
    assert_eq!(vals(&got), vals(&ops::take(&table, &ids, 0).unwrap()));
    // Tied output projection: x Eᵀ.
    let x = arr(&data(dim, 7), &[1, dim as i32]);
    let logits = dense.as_linear(&x).unwrap();
    assert_eq!(logits.shape(), vec![1, vocab as i32]);
    let et = permute_ref(&wide(&vals(&table)), &[vocab, dim], &[1, 0]);
    assert_close(&vals(&logits), &matmul_ref(&wide(&vals(&x)), &et, 1, dim, vocab), 1e-5);

    expect_err(dense.forward(&arr(&[1.0], &[1])), "take");
}

#[test]
fn activations_match_f64_formulas() {
    let xs: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.15).collect();
    let a = arr(&xs, &[xs.len() as i32]);
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let silu: Vec<f64> = wide(&xs).iter().map(|&x| x * sig(x)).collect();
    assert_close(&vals(&nn::silu(&a).unwrap()), &silu, 1e-5);

    // Exact GELU through erf: erf(x/√2) = 1 - erfc, from the Φ relation;
    // computed with a high-precision series.
    let phi = |x: f64| {
        // Standard normal CDF by the series Φ(x) = 1/2 + φ(x) Σ x^(2n+1) / (2n+1)!!.
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= x * x / f64::from(2 * n + 1);
            sum += term;
        }
        0.5 + (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() * sum
    };
    let gelu: Vec<f64> = wide(&xs).iter().map(|&x| x * phi(x)).collect();
    assert_close(&vals(&nn::gelu(&a).unwrap()), &gelu, 1e-5);

    let k = (2.0 / std::f64::consts::PI).sqrt();
    let approx: Vec<f64> =
        wide(&xs).iter().map(|&x| 0.5 * x * (1.0 + (k * (x + 0.044715 * x.powi(3))).tanh())).collect();
    assert_close(&vals(&nn::gelu_approx(&a).unwrap()), &approx, 1e-5);
    // The approximation stays near the exact form.
    for (i, (&p, &e)) in approx.iter().zip(&gelu).enumerate() {
        assert!((p - e).abs() < 1e-3, "index {i}: {p} vs {e}");
    }
    // Low precision keeps its dtype.
    let h = ops::astype(&a, Dtype::Bfloat16).unwrap();
    assert_eq!(nn::silu(&h).unwrap().dtype(), Dtype::Bfloat16);
    assert_eq!(nn::gelu(&h).unwrap().dtype(), Dtype::Bfloat16);
    assert_close(&vals(&nn::gelu_approx(&h).unwrap()), &approx, 3e-2);
}

#[test]
fn repeat_kv_repeats_each_head() {
    // [B=1, H_kv=2, L=2, D=3]
    let x = iota(&[1, 2, 2, 3]);
    let r = nn::repeat_kv(&x, 3).unwrap();
    assert_eq!(r.shape(), vec![1, 6, 2, 3]);
    let v = vals(&r);
    let head0: Vec<f32> = (0..6).map(|i| i as f32).collect();
    let head1: Vec<f32> = (6..12).map(|i| i as f32).collect();
    for h in 0..6 {
        let want = if h < 3 { &head0 } else { &head1 };
        assert_eq!(&v[h * 6..(h + 1) * 6], &want[..], "head {h}");
    }
    // n = 1 is the input itself.
    assert_eq!(vals(&nn::repeat_kv(&x, 1).unwrap()), vals(&x));
    expect_err(nn::repeat_kv(&iota(&[2, 2, 3]), 2), "repeat_kv");
}

/// Three layers of different widths, dense or quantised, with or without biases.
fn three_layers(quantised: bool, biased: bool) -> Vec<Linear> {
    [4usize, 2, 3]
        .iter()
        .enumerate()
        .map(|(i, &rows)| {
            let w = arr(&data(rows * IN, 20 + i as u64), &[rows as i32, IN as i32]);
            let b = biased.then(|| arr(&data(rows, 30 + i as u64), &[rows as i32]));
            if quantised {
                Linear::quantized(ops::quantize(&w, 64, 4).unwrap(), b)
            } else {
                Linear::dense(w, b).unwrap()
            }
        })
        .collect()
}

#[test]
fn fused_linears_equal_the_parts_which_keep_working() {
    let x = arr(&data(IN, 40), &[1, 1, IN as i32]);
    let xs = arr(&data(3 * IN, 41), &[3, IN as i32]);
    for quantised in [false, true] {
        for biased in [false, true] {
            let mut layers = three_layers(quantised, biased);
            let want: Vec<Vec<f32>> = layers.iter().map(|l| vals(&l.forward(&x).unwrap())).collect();
            let want_s: Vec<Vec<f32>> = layers.iter().map(|l| vals(&l.forward(&xs).unwrap())).collect();
            let mut parts: Vec<&mut Linear> = layers.iter_mut().collect();
            let fused = nn::FusedLinear::fuse(&mut parts).unwrap().expect("compatible layers fuse");
            let got = fused.forward(&x).unwrap();
            assert_eq!(got.len(), 3);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.shape(), vec![1, 1, [4, 2, 3][i]]);
                assert_close(&vals(g), &wide(w), 1e-5);
            }
            // The parts now view the fused weights and still give their own outputs.
            for (l, w) in layers.iter().zip(&want_s) {
                assert_close(&vals(&l.forward(&xs).unwrap()), &wide(w), 1e-5);
            }
        }
    }
}

#[test]
fn layers_that_cannot_run_as_one_matmul_are_not_fused() {
    // A LoRA adapter on one part.
    let mut layers = three_layers(false, false);
    let (a, b) = (arr(&data(IN * 2, 50), &[IN as i32, 2]), arr(&data(2 * 2, 51), &[2, 2]));
    layers[1].lora = Some(mlx_metal::lora::LoraLayer::new(a, b, 1.0, 0.0).unwrap());
    let mut parts: Vec<&mut Linear> = layers.iter_mut().collect();
    assert!(nn::FusedLinear::fuse(&mut parts).unwrap().is_none());
    // Dense next to quantised; a bias on only some parts.
    let mut mixed = three_layers(false, false);
    mixed[2] = three_layers(true, false).remove(2);
    let mut parts: Vec<&mut Linear> = mixed.iter_mut().collect();
    assert!(nn::FusedLinear::fuse(&mut parts).unwrap().is_none());
    let mut some_bias = three_layers(false, false);
    some_bias[0].bias = Some(arr(&data(4, 52), &[4]));
    let mut parts: Vec<&mut Linear> = some_bias.iter_mut().collect();
    assert!(nn::FusedLinear::fuse(&mut parts).unwrap().is_none());
    // A single layer has nothing to fuse with.
    let mut one = three_layers(false, false);
    assert!(nn::FusedLinear::fuse(&mut [&mut one[0]]).unwrap().is_none());
}

/// A float32 layer with a decode twin of the same values (16-bit, or
/// quantised with float32 scales): a few rows read the twin, more rows the
/// float32 copy, and both give the float32 product; fusing keeps the twins.
#[test]
fn a_decode_twin_gives_what_the_float32_copy_gives() {
    let w32 = ops::astype(
        &ops::astype(&arr(&data(OUT * IN, 11), &[OUT as i32, IN as i32]), Dtype::Bfloat16).unwrap(),
        Dtype::Float32,
    )
    .unwrap();
    let bf16 = ops::astype(&w32, Dtype::Bfloat16).unwrap();
    let q = ops::quantize(&w32, 64, 4).unwrap();
    let dense_q = ops::dequantize(&q, Some(Dtype::Float32)).unwrap();
    for (twin, weight, what) in
        [(LinearWeight::Dense(bf16), w32.clone(), "bfloat16"), (LinearWeight::Quantized(q), dense_q, "4-bit")]
    {
        let plain = Linear::dense(weight.clone(), None).unwrap();
        let mut twinned = Linear::dense(weight, None).unwrap();
        twinned.narrow = Some(twin);
        for rows in [1, nn::NARROW_ROWS, nn::NARROW_ROWS + 1, 9] {
            let x = arr(&data(rows * IN, 12 + rows as u64), &[rows as i32, IN as i32]);
            let want = vals(&plain.forward(&x).unwrap());
            assert_close(&vals(&twinned.forward(&x).unwrap()), &wide(&want), 1e-5);
        }
        // Fused with a second twinned layer, each part keeps a view of its twin.
        let mut other = twinned.clone();
        let mut parts = [&mut twinned, &mut other];
        let fused = nn::FusedLinear::fuse(&mut parts).unwrap().expect("twinned layers fuse");
        assert!(twinned.narrow.is_some() && other.narrow.is_some(), "{what}");
        let x = arr(&data(IN, 20), &[1, IN as i32]);
        let outs = fused.forward(&x).unwrap();
        let want = vals(&plain.forward(&x).unwrap());
        for o in &outs {
            assert_close(&vals(o), &wide(&want), 1e-5);
        }
        // A twinned layer does not fuse with one without.
        let mut bare = plain.clone();
        let mut parts = [&mut twinned, &mut bare];
        assert!(nn::FusedLinear::fuse(&mut parts).unwrap().is_none(), "{what}");
    }
}
