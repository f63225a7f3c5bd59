// SPDX-License-Identifier: EUPL-1.2
//! conv2d against a float64 reference, and the expert bank of nn.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use common::assert_close;
use mlx::ops::{self, Conv2d};
use mlx::{Array, Dtype};
use mlx_metal::nn::{LinearWeight, SwitchLinear};

fn reference_conv(
    x: &[f32],
    (n, h, w, c): (usize, usize, usize, usize),
    k: &[f32],
    (o, kh, kw): (usize, usize, usize),
    stride: usize,
    pad: usize,
) -> (Vec<f64>, (usize, usize)) {
    let oh = (h + 2 * pad - kh) / stride + 1;
    let ow = (w + 2 * pad - kw) / stride + 1;
    let mut out = vec![0.0f64; n * oh * ow * o];
    for b in 0..n {
        for i in 0..oh {
            for j in 0..ow {
                for oc in 0..o {
                    let mut acc = 0.0f64;
                    for di in 0..kh {
                        for dj in 0..kw {
                            let (yi, xj) =
                                ((i * stride + di) as isize - pad as isize, (j * stride + dj) as isize - pad as isize);
                            if yi < 0 || xj < 0 || yi >= h as isize || xj >= w as isize {
                                continue;
                            }
                            for ic in 0..c {
                                let xv = x[((b * h + yi as usize) * w + xj as usize) * c + ic];
                                let kv = k[((oc * kh + di) * kw + dj) * c + ic];
                                acc += f64::from(xv) * f64::from(kv);
                            }
                        }
                    }
                    out[((b * oh + i) * ow + j) * o + oc] = acc;
                }
            }
        }
    }
    (out, (oh, ow))
}

#[test]
fn conv2d_matches_a_float64_reference() {
    let (n, h, w, c, o, kh, kw) = (2, 5, 6, 3, 4, 3, 2);
    let x: Vec<f32> = (0..n * h * w * c).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
    let k: Vec<f32> = (0..o * kh * kw * c).map(|i| ((i * 5 % 13) as f32 - 6.0) / 8.0).collect();
    let xa = Array::from_slice(&x, &[n as i32, h as i32, w as i32, c as i32]).unwrap();
    let ka = Array::from_slice(&k, &[o as i32, kh as i32, kw as i32, c as i32]).unwrap();
    for (stride, pad) in [(1, 0), (2, 1), (1, 1)] {
        let opts = Conv2d { stride: (stride, stride), padding: (pad, pad), ..Conv2d::default() };
        let got = ops::conv2d(&xa, &ka, opts).unwrap();
        let (want, (oh, ow)) = reference_conv(&x, (n, h, w, c), &k, (o, kh, kw), stride as usize, pad as usize);
        assert_eq!(got.shape(), vec![n as i32, oh as i32, ow as i32, o as i32]);
        assert_close(&got.to_vec_f32().unwrap(), &want, 1e-4);
    }
}

#[test]
fn conv2d_rejects_mismatched_channels() {
    let x = ops::zeros(&[1, 4, 4, 3], Dtype::Float32).unwrap();
    let k = ops::zeros(&[2, 3, 3, 5], Dtype::Float32).unwrap();
    let e = ops::conv2d(&x, &k, Conv2d::default()).unwrap_err();
    assert_eq!(e.op(), "conv2d");
}

#[test]
fn switch_linear_picks_experts_dense_and_quantised() {
    let (experts, out, inp) = (3, 4, 64);
    let w: Vec<f32> = (0..experts * out * inp).map(|i| ((i * 31 % 17) as f32 - 8.0) / 16.0).collect();
    let wa = Array::from_slice(&w, &[experts as i32, out as i32, inp as i32]).unwrap();
    let x: Vec<f32> = (0..2 * inp).map(|i| ((i * 3 % 7) as f32 - 3.0) / 4.0).collect();
    let xa = Array::from_slice(&x, &[2, 1, 1, inp as i32]).unwrap();
    let idx = Array::from_slice(&[2u32, 0], &[2, 1]).unwrap();
    let dense = SwitchLinear { weight: LinearWeight::Dense(wa.clone()), bias: None };
    let got = dense.forward(&xa, &idx, false).unwrap();
    assert_eq!(got.shape(), vec![2, 1, 1, out as i32]);
    let mut want = Vec::new();
    for (row, e) in [(0usize, 2usize), (1, 0)] {
        for o in 0..out {
            let s: f64 = (0..inp).map(|i| f64::from(x[row * inp + i]) * f64::from(w[(e * out + o) * inp + i])).sum();
            want.push(s);
        }
    }
    assert_close(&got.to_vec_f32().unwrap(), &want, 1e-5);
    let q = SwitchLinear { weight: LinearWeight::Quantized(ops::quantize(&wa, 64, 8).unwrap()), bias: None };
    assert_close(&q.forward(&xa, &idx, false).unwrap().to_vec_f32().unwrap(), &want, 2e-2);
}
