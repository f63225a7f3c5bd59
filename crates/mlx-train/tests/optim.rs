// SPDX-License-Identifier: EUPL-1.2
//! AdamW, the schedule, clipping and the masked loss against hand-computed
//! float64 references of MLX's and mlx-lm's formulas.

use mlx::{Array, Dtype, ops};
use mlx_train::loss::{cross_entropy, masked_loss, target_mask};
use mlx_train::{AdamW, AdamWConfig, LrSchedule, clip_grad_norm};

fn vals(a: &Array) -> Vec<f64> {
    ops::astype(a, Dtype::Float32).unwrap().to_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
}

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * y.abs().max(1.0), "index {i}: {x} vs {y}");
    }
}

/// MLX's AdamW on one scalar, in float64.
fn reference(p: &mut f64, m: &mut f64, v: &mut f64, g: f64, lr: f64, c: &AdamWConfig, t: i32) {
    let (b1, b2) = (f64::from(c.betas.0), f64::from(c.betas.1));
    let eps = f64::from(c.eps);
    *p *= 1.0 - lr * f64::from(c.weight_decay);
    *m = b1 * *m + (1.0 - b1) * g;
    *v = b2 * *v + (1.0 - b2) * g * g;
    if c.bias_correction {
        let c1 = lr / (1.0 - b1.powi(t));
        let c2 = 1.0 / (1.0 - b2.powi(t)).sqrt();
        *p -= c1 * *m / (v.sqrt() * c2 + eps);
    } else {
        *p -= lr * *m / (v.sqrt() + eps);
    }
}

#[test]
fn adamw_follows_mlx_step_by_step() {
    for bias_correction in [false, true] {
        let cfg = AdamWConfig { weight_decay: 0.1, bias_correction, ..AdamWConfig::default() };
        let mut opt = AdamW::new(cfg);
        let mut p = vec![Array::from_slice(&[1.0f32, -2.0, 0.5], &[3]).unwrap()];
        let (mut rp, mut rm, mut rv) = (vec![1.0, -2.0, 0.5], vec![0.0; 3], vec![0.0; 3]);
        let grads = [[0.1f32, -0.3, 0.2], [-0.05, 0.4, 0.0], [0.3, 0.3, -0.1]];
        for (t, g) in grads.iter().enumerate() {
            let lr = 1e-2 * (t as f32 + 1.0);
            p = opt.update(&p, &[Array::from_slice(g, &[3]).unwrap()], lr).unwrap();
            for i in 0..3 {
                reference(&mut rp[i], &mut rm[i], &mut rv[i], f64::from(g[i]), f64::from(lr), &cfg, t as i32 + 1);
            }
            close(&vals(&p[0]), &rp, 1e-5);
        }
        assert_eq!(opt.step, 3);
        close(&vals(&opt.m[0]), &rm, 1e-5);
    }
}

#[test]
fn adamw_defaults_are_mlx_s_and_bad_input_is_an_error() {
    let c = AdamWConfig::default();
    assert_eq!((c.betas, c.eps, c.weight_decay, c.bias_correction), ((0.9, 0.999), 1e-8, 0.01, false));
    let mut opt = AdamW::new(c);
    let p = [Array::from_slice(&[1.0f32], &[1]).unwrap()];
    assert!(opt.update(&p, &[], 1e-3).is_err(), "fewer gradients than parameters");
    assert!(AdamWConfig { betas: (1.0, 0.9), ..c }.validate().is_err());
    assert!(AdamWConfig { eps: f32::NAN, ..c }.validate().is_err());
}

#[test]
fn adamw_keeps_bfloat16_parameters_in_bfloat16() {
    let mut opt = AdamW::new(AdamWConfig::default());
    let p = [ops::astype(&Array::from_slice(&[1.0f32, 2.0], &[2]).unwrap(), Dtype::Bfloat16).unwrap()];
    let g = [ops::astype(&Array::from_slice(&[0.5f32, -0.5], &[2]).unwrap(), Dtype::Bfloat16).unwrap()];
    let out = opt.update(&p, &g, 1e-2).unwrap();
    assert_eq!(out[0].dtype(), Dtype::Bfloat16);
    assert_eq!(opt.m[0].dtype(), Dtype::Bfloat16);
}

#[test]
fn schedule_warms_up_linearly_then_decays_along_a_cosine() {
    let lr = 1e-3f32;
    let s = LrSchedule { warmup_steps: 4, warmup_init: 0.0, cosine_decay_steps: Some(10), end: 1e-5 };
    let at = |k| f64::from(s.at(lr, k));
    close(&[at(0), at(1), at(2), at(4)], &[0.0, 2.5e-4, 5e-4, 1e-3], 1e-6);
    // mlx-lm joins at warmup + 1: step 5 is the cosine's step 0.
    close(&[at(5)], &[1e-3], 1e-6);
    let cos = |k: f64| 1e-5 + 0.5 * (1.0 + (std::f64::consts::PI * k / 10.0).cos()) * (1e-3 - 1e-5);
    close(&[at(6), at(10), at(15), at(100)], &[cos(1.0), cos(5.0), cos(10.0), cos(10.0)], 1e-5);
    // No schedule: constant.
    assert_eq!(LrSchedule::default().at(lr, 123), lr);
    assert!(LrSchedule { cosine_decay_steps: Some(0), ..s }.validate().is_err());
}

#[test]
fn clipping_scales_to_the_global_norm_only_above_it() {
    let g = [Array::from_slice(&[3.0f32], &[1]).unwrap(), Array::from_slice(&[4.0f32], &[1]).unwrap()];
    let (clipped, norm) = clip_grad_norm(&g, 1.0).unwrap();
    close(&vals(&norm), &[5.0], 1e-6);
    let f = 1.0 / (5.0 + 1e-6);
    close(&[vals(&clipped[0])[0], vals(&clipped[1])[0]], &[3.0 * f, 4.0 * f], 1e-6);
    let (same, _) = clip_grad_norm(&g, 10.0).unwrap();
    close(&[vals(&same[0])[0], vals(&same[1])[0]], &[3.0, 4.0], 0.0);
}

#[test]
fn masked_loss_is_mlx_lm_s_default_loss() {
    // Two rows, three target positions, vocabulary of four.
    let logits: Vec<f32> = (0..24).map(|i| ((i * 7) % 5) as f32 * 0.5 - 1.0).collect();
    let l = Array::from_slice(&logits, &[2, 3, 4]).unwrap();
    let targets = Array::from_slice(&[1i32, 2, 3, 0, 0, 1], &[2, 3]).unwrap();
    // Row 0: offset 2, length 3 -> steps 2 and 3 count. Row 1: offset 0, length 1 -> step 1.
    let lengths = Array::from_slice(&[2i32, 3, 0, 1], &[2, 2]).unwrap();
    let mask = ops::astype(&target_mask(&lengths, 3).unwrap(), Dtype::Int32).unwrap().to_vec::<i32>().unwrap();
    assert_eq!(mask, [0, 1, 1, 1, 0, 0]);
    let ce = |row: usize, pos: usize, t: usize| {
        let x: Vec<f64> = (0..4).map(|v| f64::from(logits[row * 12 + pos * 4 + v])).collect();
        let lse = x.iter().map(|v| v.exp()).sum::<f64>().ln();
        lse - x[t]
    };
    let all = vals(&cross_entropy(&l, &targets).unwrap());
    close(&all, &[ce(0, 0, 1), ce(0, 1, 2), ce(0, 2, 3), ce(1, 0, 0), ce(1, 1, 0), ce(1, 2, 1)], 1e-5);
    let (loss, ntoks) = masked_loss(&l, &targets, &lengths).unwrap();
    assert_eq!(ops::astype(&ntoks, Dtype::Int32).unwrap().item::<i32>().unwrap(), 3);
    close(&vals(&loss), &[(ce(0, 1, 2) + ce(0, 2, 3) + ce(1, 0, 0)) / 3.0], 1e-5);
}
