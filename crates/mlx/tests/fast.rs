// SPDX-License-Identifier: EUPL-1.2
//! The fused kernels: rms_norm, layer_norm, rope (base and custom
//! frequencies, fixed and array offsets) and scaled dot-product attention
//! (no mask, causal, boolean and additive masks, grouped heads, sinks),
//! against float64 references.

mod common;

use common::{arr, assert_close, data, expect_err, iarr, softmax_ref, vals, wide};
use mlx::fast::{self, AttentionMask, RopeFreqs, RopeOffset, Rotation};
use mlx::{Array, Dtype, Error, ops};

fn rms_ref(x: &[f64], d: usize, w: Option<&[f64]>, eps: f64) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps).sqrt();
            row.iter().enumerate().map(move |(i, v)| v * r * w.map_or(1.0, |w| w[i])).collect::<Vec<_>>()
        })
        .collect()
}

fn ln_ref(x: &[f64], d: usize, w: Option<&[f64]>, b: Option<&[f64]>, eps: f64) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|row| {
            let m = row.iter().sum::<f64>() / d as f64;
            let v = row.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / d as f64;
            let r = 1.0 / (v + eps).sqrt();
            row.iter()
                .enumerate()
                .map(move |(i, x)| (x - m) * r * w.map_or(1.0, |w| w[i]) + b.map_or(0.0, |b| b[i]))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rms_norm_matches_f64() {
    let (rows, d) = (4usize, 16usize);
    let x = data(rows * d, 1);
    let w = data(d, 2);
    let xa = arr(&x, &[rows as i32, d as i32]);
    let out = fast::rms_norm(&xa, Some(&arr(&w, &[d as i32])), 1e-5).unwrap();
    assert_close(&vals(&out), &rms_ref(&wide(&x), d, Some(&wide(&w)), 1e-5), 1e-5);
    let out = fast::rms_norm(&xa, None, 1e-6).unwrap();
    assert_close(&vals(&out), &rms_ref(&wide(&x), d, None, 1e-6), 1e-5);
    // A transposed input is normalised along its logical last axis.
    let t = ops::transpose(&arr(&x, &[d as i32, rows as i32]), &[1, 0]).unwrap();
    let xt = common::permute_ref(&wide(&x), &[d, rows], &[1, 0]);
    assert_close(&vals(&fast::rms_norm(&t, None, 1e-5).unwrap()), &rms_ref(&xt, d, None, 1e-5), 1e-5);
    // bf16 in, bf16 out.
    let h = ops::astype(&xa, Dtype::Bfloat16).unwrap();
    let hb = fast::rms_norm(&h, None, 1e-5).unwrap();
    assert_eq!(hb.dtype(), Dtype::Bfloat16);
    assert_close(&vals(&hb), &rms_ref(&wide(&vals(&h)), d, None, 1e-5), 2e-2);

    expect_err(fast::rms_norm(&xa, Some(&arr(&w[..8], &[8])), 1e-5), "rms_norm");
    expect_err(fast::rms_norm(&xa, Some(&arr(&x, &[rows as i32, d as i32])), 1e-5), "rms_norm");
}

#[test]
fn layer_norm_matches_f64() {
    let (rows, d) = (3usize, 32usize);
    let x = data(rows * d, 3);
    let w = data(d, 4);
    let b = data(d, 5);
    let xa = arr(&x, &[rows as i32, d as i32]);
    let (wa, ba) = (arr(&w, &[d as i32]), arr(&b, &[d as i32]));
    let out = fast::layer_norm(&xa, Some(&wa), Some(&ba), 1e-5).unwrap();
    assert_close(&vals(&out), &ln_ref(&wide(&x), d, Some(&wide(&w)), Some(&wide(&b)), 1e-5), 1e-5);
    let out = fast::layer_norm(&xa, None, None, 1e-5).unwrap();
    assert_close(&vals(&out), &ln_ref(&wide(&x), d, None, None, 1e-5), 1e-5);
    let out = fast::layer_norm(&xa, None, Some(&ba), 1e-5).unwrap();
    assert_close(&vals(&out), &ln_ref(&wide(&x), d, None, Some(&wide(&b)), 1e-5), 1e-5);

    expect_err(fast::layer_norm(&xa, Some(&arr(&w[..4], &[4])), None, 1e-5), "layer_norm");
    expect_err(fast::layer_norm(&xa, None, Some(&arr(&b[..4], &[4])), 1e-5), "layer_norm");
}

/// How a rope reference rotates: `inv_freq[i]` multiplies the position for
/// pair i (`dims / 2` of them); positions are `(offset + p) * scale`.
struct Rope<'a> {
    dims: usize,
    traditional: bool,
    inv_freq: &'a [f64],
    scale: f64,
    offset: f64,
}

/// Rope reference for x: [L, D] on the first `r.dims` features.
fn rope_ref(x: &[f64], l: usize, d: usize, r: &Rope<'_>) -> Vec<f64> {
    let mut out = x.to_vec();
    let half = r.dims / 2;
    for p in 0..l {
        let pos = (r.offset + p as f64) * r.scale;
        let row = &x[p * d..(p + 1) * d];
        let o = &mut out[p * d..(p + 1) * d];
        for (i, f) in r.inv_freq.iter().enumerate().take(half) {
            let (s, c) = (pos * f).sin_cos();
            let (a, b) = if r.traditional { (2 * i, 2 * i + 1) } else { (i, i + half) };
            o[a] = row[a] * c - row[b] * s;
            o[b] = row[a] * s + row[b] * c;
        }
    }
    out
}

fn base_freqs(dims: usize, base: f64) -> Vec<f64> {
    (0..dims / 2).map(|i| base.powf(-2.0 * i as f64 / dims as f64)).collect()
}

#[test]
fn rope_with_base_frequencies() {
    let (l, d) = (5usize, 16usize);
    let x = data(l * d, 7);
    let xa = arr(&x, &[1, 1, l as i32, d as i32]);
    for traditional in [false, true] {
        for (dims, offset, scale) in [(16usize, 0, 1.0f32), (16, 3, 1.0), (8, 2, 0.5)] {
            let out =
                fast::rope(&xa, dims as i32, traditional, RopeFreqs::Base(10000.0), scale, RopeOffset::Fixed(offset))
                    .unwrap();
            assert_eq!(out.shape(), vec![1, 1, l as i32, d as i32]);
            let inv_freq = base_freqs(dims, 10000.0);
            let r = Rope { dims, traditional, inv_freq: &inv_freq, scale: f64::from(scale), offset: f64::from(offset) };
            let want = rope_ref(&wide(&x), l, d, &r);
            assert_close(&vals(&out), &want, 1e-5);
        }
    }
}

#[test]
fn rope_with_custom_frequencies() {
    let (l, d) = (4usize, 8usize);
    let x = data(l * d, 8);
    let xa = arr(&x, &[1, l as i32, d as i32]);
    let freqs = [1.0f32, 4.0, 16.0, 64.0];
    let fa = arr(&freqs, &[4]);
    let inv: Vec<f64> = freqs.iter().map(|&f| 1.0 / f64::from(f)).collect();
    for traditional in [false, true] {
        let out = fast::rope(&xa, d as i32, traditional, RopeFreqs::Custom(&fa), 1.0, RopeOffset::Fixed(2)).unwrap();
        assert_close(
            &vals(&out),
            &rope_ref(&wide(&x), l, d, &Rope { dims: d, traditional, inv_freq: &inv, scale: 1.0, offset: 2.0 }),
            1e-5,
        );
    }
    // Wrong number of frequencies.
    expect_err(
        fast::rope(&xa, d as i32, false, RopeFreqs::Custom(&arr(&freqs[..3], &[3])), 1.0, RopeOffset::Fixed(0)),
        "rope",
    );
}

#[test]
fn rope_with_array_offsets() {
    let (l, d) = (3usize, 8usize);
    let x = data(2 * l * d, 9);
    let xa = arr(&x, &[2, 1, l as i32, d as i32]);
    let freqs = base_freqs(d, 10000.0);
    // A scalar array offset equals the fixed offset.
    let fixed = fast::rope(&xa, d as i32, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(4)).unwrap();
    let dynamic =
        fast::rope(&xa, d as i32, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Array(&Array::scalar(4i32)))
            .unwrap();
    assert_close(&vals(&dynamic), &wide(&vals(&fixed)), 1e-6);
    // One offset per batch row.
    let per_row =
        fast::rope(&xa, d as i32, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Array(&iarr(&[1, 6], &[2])))
            .unwrap();
    let at = |offset| Rope { dims: d, traditional: false, inv_freq: &freqs, scale: 1.0, offset };
    let mut want = rope_ref(&wide(&x[..l * d]), l, d, &at(1.0));
    want.extend(rope_ref(&wide(&x[l * d..]), l, d, &at(6.0)));
    assert_close(&vals(&per_row), &want, 1e-5);
}

/// `qk_norm_rope` refuses what it cannot split into heads, a weight of the wrong shape and a bad
/// rotation, naming what was wrong; on the CPU its result is MLX's ops (`tests/custom_kernels.rs`).
#[test]
fn qk_norm_rope_errors() {
    let y = arr(&data(2 * 3 * 16, 1), &[2, 3, 16]);
    let rot = |dims| Rotation {
        dims,
        traditional: false,
        freqs: RopeFreqs::Base(10000.0),
        scale: 1.0,
        offset: RopeOffset::Fixed(0),
    };
    assert_eq!(fast::qk_norm_rope(&y, 2, 8, None, &rot(8)).unwrap().shape(), vec![2, 2, 3, 8]);
    let e = expect_err(fast::qk_norm_rope(&y, 3, 8, None, &rot(8)), "qk_norm_rope");
    assert!(e.to_string().contains("[2, 3, 16]"), "{e}");
    expect_err(fast::qk_norm_rope(&arr(&data(16, 1), &[16]), 2, 8, None, &rot(8)), "qk_norm_rope");
    expect_err(fast::qk_norm_rope(&y, 0, 8, None, &rot(8)), "qk_norm_rope");
    let w = arr(&data(8, 1), &[8]);
    let e = expect_err(fast::qk_norm_rope(&y, 2, 8, Some((&w, 1e-6)), &rot(8)), "qk_norm_rope");
    assert!(e.to_string().contains("weight"), "{e}");
    expect_err(fast::qk_norm_rope(&y, 2, 8, None, &rot(7)), "qk_norm_rope");
}

#[test]
fn rope_errors() {
    let xa = arr(&data(32, 1), &[1, 4, 8]);
    let e = expect_err(fast::rope(&xa, 7, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(0)), "rope");
    assert!(matches!(e, Error::InvalidArgument { .. }));
    expect_err(fast::rope(&xa, 0, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(0)), "rope");
    expect_err(fast::rope(&xa, -2, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(0)), "rope");
    expect_err(fast::rope(&xa, 16, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(0)), "rope");
    expect_err(
        fast::rope(&arr(&data(8, 1), &[8]), 8, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(0)),
        "rope",
    );
    let bad_offset = arr(&[1.0], &[1]);
    expect_err(fast::rope(&xa, 8, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Array(&bad_offset)), "rope");
}

/// Reference attention for q: [H, qL, D], k, v: [Hkv, kL, D]; `mask(h, i, j)`
/// is an additive bias (−∞ to hide); `sinks[h]` joins the softmax.
fn sdpa_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    (h, hkv, ql, kl, d): (usize, usize, usize, usize, usize),
    scale: f64,
    mask: impl Fn(usize, usize, usize) -> f64,
    sinks: Option<&[f64]>,
) -> Vec<f64> {
    let mut out = vec![0.0; h * ql * d];
    for hh in 0..h {
        let kh = hh / (h / hkv);
        for i in 0..ql {
            let mut scores: Vec<f64> = (0..kl)
                .map(|j| {
                    let dot: f64 = (0..d).map(|t| q[(hh * ql + i) * d + t] * k[(kh * kl + j) * d + t]).sum();
                    dot * scale + mask(hh, i, j)
                })
                .collect();
            if let Some(s) = sinks {
                scores.push(s[hh]);
            }
            let p = softmax_ref(&scores, scores.len());
            for t in 0..d {
                out[(hh * ql + i) * d + t] = (0..kl).map(|j| p[j] * v[(kh * kl + j) * d + t]).sum();
            }
        }
    }
    out
}

struct Qkv {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qa: Array,
    ka: Array,
    va: Array,
}

fn qkv(h: usize, hkv: usize, ql: usize, kl: usize, d: usize, seed: u64) -> Qkv {
    let q = data(h * ql * d, seed);
    let k = data(hkv * kl * d, seed + 1);
    let v = data(hkv * kl * d, seed + 2);
    let qa = arr(&q, &[1, h as i32, ql as i32, d as i32]);
    let ka = arr(&k, &[1, hkv as i32, kl as i32, d as i32]);
    let va = arr(&v, &[1, hkv as i32, kl as i32, d as i32]);
    Qkv { q, k, v, qa, ka, va }
}

#[test]
fn sdpa_without_a_mask() {
    let dims = (2, 2, 3, 5, 8);
    let t = qkv(2, 2, 3, 5, 8, 10);
    let scale = 1.0 / 8f32.sqrt();
    let out = fast::scaled_dot_product_attention(&t.qa, &t.ka, &t.va, scale, AttentionMask::None, None).unwrap();
    assert_eq!(out.shape(), vec![1, 2, 3, 8]);
    let want = sdpa_ref(&wide(&t.q), &wide(&t.k), &wide(&t.v), dims, f64::from(scale), |_, _, _| 0.0, None);
    assert_close(&vals(&out), &want, 1e-5);
}

#[test]
fn sdpa_causal_is_lower_right_aligned() {
    for (ql, kl) in [(4usize, 4usize), (2, 5), (1, 3)] {
        let dims = (2, 2, ql, kl, 4);
        let t = qkv(2, 2, ql, kl, 4, 20 + ql as u64);
        let out = fast::scaled_dot_product_attention(&t.qa, &t.ka, &t.va, 0.5, AttentionMask::Causal, None).unwrap();
        let causal = |_: usize, i: usize, j: usize| if j <= i + (kl - ql) { 0.0 } else { f64::NEG_INFINITY };
        let want = sdpa_ref(&wide(&t.q), &wide(&t.k), &wide(&t.v), dims, 0.5, causal, None);
        assert_close(&vals(&out), &want, 1e-5);
    }
}

#[test]
fn sdpa_with_array_masks() {
    let (ql, kl) = (3usize, 4usize);
    let dims = (2, 2, ql, kl, 4);
    let t = qkv(2, 2, ql, kl, 4, 30);
    // Boolean: true attends. Each query sees at least one key.
    let allowed = [true, false, true, false, false, true, true, false, true, true, true, true];
    let m = Array::from_slice(&allowed, &[ql as i32, kl as i32]).unwrap();
    let out = fast::scaled_dot_product_attention(&t.qa, &t.ka, &t.va, 0.7, AttentionMask::Array(&m), None).unwrap();
    let bmask = |_: usize, i: usize, j: usize| if allowed[i * kl + j] { 0.0 } else { f64::NEG_INFINITY };
    assert_close(&vals(&out), &sdpa_ref(&wide(&t.q), &wide(&t.k), &wide(&t.v), dims, 0.7, bmask, None), 1e-5);

    // Additive, per head: [1, H, qL, kL].
    let bias = data(2 * ql * kl, 31);
    let ma = arr(&bias, &[1, 2, ql as i32, kl as i32]);
    let out = fast::scaled_dot_product_attention(&t.qa, &t.ka, &t.va, 0.7, AttentionMask::Array(&ma), None).unwrap();
    let amask = |h: usize, i: usize, j: usize| f64::from(bias[(h * ql + i) * kl + j]);
    assert_close(&vals(&out), &sdpa_ref(&wide(&t.q), &wide(&t.k), &wide(&t.v), dims, 0.7, amask, None), 1e-5);

    // A mask that does not broadcast.
    let bad = arr(&data(ql * 3, 1), &[ql as i32, 3]);
    expect_err(
        fast::scaled_dot_product_attention(&t.qa, &t.ka, &t.va, 0.7, AttentionMask::Array(&bad), None),
        "scaled_dot_product_attention",
    );
}

#[test]
fn sdpa_with_grouped_heads_and_sinks() {
    let (h, hkv, ql, kl, d) = (4usize, 2usize, 2usize, 3usize, 4usize);
    let t = qkv(h, hkv, ql, kl, d, 40);
    let out = fast::scaled_dot_product_attention(&t.qa, &t.ka, &t.va, 0.5, AttentionMask::None, None).unwrap();
    assert_eq!(out.shape(), vec![1, h as i32, ql as i32, d as i32]);
    let want = sdpa_ref(&wide(&t.q), &wide(&t.k), &wide(&t.v), (h, hkv, ql, kl, d), 0.5, |_, _, _| 0.0, None);
    assert_close(&vals(&out), &want, 1e-5);

    let sinks = [0.5f32, -1.0, 2.0, 0.0];
    let sa = arr(&sinks, &[h as i32]);
    let out = fast::scaled_dot_product_attention(&t.qa, &t.ka, &t.va, 0.5, AttentionMask::Causal, Some(&sa)).unwrap();
    let causal = |_: usize, i: usize, j: usize| if j <= i + (kl - ql) { 0.0 } else { f64::NEG_INFINITY };
    let want = sdpa_ref(&wide(&t.q), &wide(&t.k), &wide(&t.v), (h, hkv, ql, kl, d), 0.5, causal, Some(&wide(&sinks)));
    assert_close(&vals(&out), &want, 1e-5);
}

#[test]
fn sdpa_in_bfloat16() {
    let dims = (2, 1, 3, 6, 8);
    let t = qkv(2, 1, 3, 6, 8, 50);
    let cast = |a: &Array| ops::astype(a, Dtype::Bfloat16).unwrap();
    let (q, k, v) = (cast(&t.qa), cast(&t.ka), cast(&t.va));
    let out = fast::scaled_dot_product_attention(&q, &k, &v, 0.35, AttentionMask::Causal, None).unwrap();
    assert_eq!(out.dtype(), Dtype::Bfloat16);
    let causal = |_: usize, i: usize, j: usize| if j <= i + 3 { 0.0 } else { f64::NEG_INFINITY };
    let want = sdpa_ref(&wide(&vals(&q)), &wide(&vals(&k)), &wide(&vals(&v)), dims, 0.35, causal, None);
    assert_close(&vals(&out), &want, 2e-2);
}

#[test]
fn sdpa_errors() {
    let op = "scaled_dot_product_attention";
    let t = qkv(2, 2, 3, 4, 8, 60);
    // Mismatched head dims.
    let k4 = arr(&data(2 * 4 * 4, 1), &[1, 2, 4, 4]);
    expect_err(fast::scaled_dot_product_attention(&t.qa, &k4, &t.va, 1.0, AttentionMask::None, None), op);
    // Keys and values of different lengths.
    let v5 = arr(&data(2 * 5 * 8, 2), &[1, 2, 5, 8]);
    expect_err(fast::scaled_dot_product_attention(&t.qa, &t.ka, &v5, 1.0, AttentionMask::None, None), op);
    // Query heads not a multiple of key/value heads.
    let t3 = qkv(3, 2, 3, 4, 8, 61);
    expect_err(fast::scaled_dot_product_attention(&t3.qa, &t3.ka, &t3.va, 1.0, AttentionMask::None, None), op);
    // Not four-dimensional.
    let q3 = arr(&t.q, &[2, 3, 8]);
    expect_err(fast::scaled_dot_product_attention(&q3, &t.ka, &t.va, 1.0, AttentionMask::None, None), op);
}

/// `grouped_attention` (what `scaled_dot_product_attention` runs on CUDA for
/// short queries under a mask) against the f64 reference and MLX's own
/// attention: a batch of two rows, four query heads per key/value head, keys
/// and values read from a longer buffer as a cache holds them.
#[test]
fn grouped_attention_equals_sdpa() {
    let (b, h, hkv, d) = (2usize, 8usize, 2usize, 16usize);
    for (ql, kl, kind) in [(1usize, 6usize, "rows"), (3, 7, "causal"), (3, 7, "heads"), (2, 5, "none")] {
        let seed = 70 + ql as u64 + kl as u64;
        let (q, k, v) =
            (data(b * h * ql * d, seed), data(b * hkv * kl * d, seed + 1), data(b * hkv * kl * d, seed + 2));
        let qa = arr(&q, &[b as i32, h as i32, ql as i32, d as i32]);
        let cached = |x: &[f32]| {
            let x = arr(x, &[b as i32, hkv as i32, kl as i32, d as i32]);
            let spare = arr(&data(b * hkv * 3 * d, seed + 3), &[b as i32, hkv as i32, 3, d as i32]);
            ops::slice_axis(&ops::concatenate(&[&x, &spare], 2).unwrap(), 2, 0, kl as i32).unwrap()
        };
        let (ka, va) = (cached(&k), cached(&v));
        // Row 0 hides its first two keys (left padding), row 1 none.
        let pad = [2usize, 0];
        let visible: Vec<bool> = (0..b * kl).map(|i| i % kl >= pad[i / kl]).collect();
        let rows = Array::from_slice(&visible, &[b as i32, 1, 1, kl as i32]).unwrap();
        let bias = data(h * ql * kl, seed + 4);
        let heads = arr(&bias, &[1, h as i32, ql as i32, kl as i32]);
        let mask = match kind {
            "rows" => AttentionMask::Array(&rows),
            "heads" => AttentionMask::Array(&heads),
            "causal" => AttentionMask::Causal,
            _ => AttentionMask::None,
        };
        let got = fast::grouped_attention(&qa, &ka, &va, 0.25, mask).unwrap();
        assert_eq!(got.shape(), vec![b as i32, h as i32, ql as i32, d as i32], "{kind}");
        let mlx = fast::scaled_dot_product_attention(&qa, &ka, &va, 0.25, mask, None).unwrap();
        assert_close(&vals(&got), &wide(&vals(&mlx)), 1e-5);
        let mut want = Vec::new();
        for r in 0..b {
            let part = |x: &[f32], n: usize| wide(&x[r * n..(r + 1) * n]);
            let bias_at = |hh: usize, i: usize, j: usize| match kind {
                "rows" if j < pad[r] => f64::NEG_INFINITY,
                "heads" => f64::from(bias[(hh * ql + i) * kl + j]),
                "causal" if j > i + (kl - ql) => f64::NEG_INFINITY,
                _ => 0.0,
            };
            let (qn, kn) = (h * ql * d, hkv * kl * d);
            want.extend(sdpa_ref(
                &part(&q, qn),
                &part(&k, kn),
                &part(&v, kn),
                (h, hkv, ql, kl, d),
                0.25,
                bias_at,
                None,
            ));
        }
        assert_close(&vals(&got), &want, 1e-5);
    }
}

#[test]
fn grouped_attention_in_bfloat16_and_its_errors() {
    let op = "grouped_attention";
    let t = qkv(4, 2, 2, 6, 8, 80);
    let cast = |a: &Array| ops::astype(a, Dtype::Bfloat16).unwrap();
    let (q, k, v) = (cast(&t.qa), cast(&t.ka), cast(&t.va));
    let got = fast::grouped_attention(&q, &k, &v, 0.35, AttentionMask::Causal).unwrap();
    assert_eq!(got.dtype(), Dtype::Bfloat16);
    let causal = |_: usize, i: usize, j: usize| if j <= i + 4 { 0.0 } else { f64::NEG_INFINITY };
    let want = sdpa_ref(&wide(&vals(&q)), &wide(&vals(&k)), &wide(&vals(&v)), (4, 2, 2, 6, 8), 0.35, causal, None);
    assert_close(&vals(&got), &want, 2e-2);

    // Query heads not a multiple of key/value heads.
    let t3 = qkv(3, 2, 1, 4, 8, 81);
    expect_err(fast::grouped_attention(&t3.qa, &t3.ka, &t3.va, 1.0, AttentionMask::None), op);
    // More queries than keys.
    let long = qkv(2, 2, 5, 4, 8, 82);
    expect_err(fast::grouped_attention(&long.qa, &long.ka, &long.va, 1.0, AttentionMask::Causal), op);
    // A mask that does not broadcast to the scores, and one of another float type.
    let bad = arr(&data(2 * 3, 1), &[2, 3]);
    expect_err(fast::grouped_attention(&q, &k, &v, 1.0, AttentionMask::Array(&bad)), op);
    let other = arr(&data(2 * 6, 1), &[2, 6]);
    expect_err(fast::grouped_attention(&q, &k, &v, 1.0, AttentionMask::Array(&other)), op);
    // Mixed types.
    expect_err(fast::grouped_attention(&t.qa, &k, &v, 1.0, AttentionMask::None), op);
}
