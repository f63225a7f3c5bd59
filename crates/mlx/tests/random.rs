// SPDX-License-Identifier: EUPL-1.2
//! Random numbers with explicit keys: determinism, independence of keys and
//! split keys, and rough statistics over many samples (generous bounds).

mod common;

use common::{arr, expect_err, vals};
use mlx::{Array, Dtype, random};

const N: i32 = 20_000;

fn mean_var(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let v = x.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / n;
    (m, v)
}

#[test]
fn keys_are_deterministic() {
    let k1 = random::key(42).unwrap();
    assert_eq!(k1.shape(), vec![2]);
    assert_eq!(k1.dtype(), Dtype::Uint32);
    assert_eq!(k1.to_vec::<u32>().unwrap(), random::key(42).unwrap().to_vec::<u32>().unwrap());
    assert_ne!(k1.to_vec::<u32>().unwrap(), random::key(43).unwrap().to_vec::<u32>().unwrap());

    let a = random::normal(&[64], Dtype::Float32, 0.0, 1.0, Some(&k1)).unwrap();
    let b = random::normal(&[64], Dtype::Float32, 0.0, 1.0, Some(&random::key(42).unwrap())).unwrap();
    let c = random::normal(&[64], Dtype::Float32, 0.0, 1.0, Some(&random::key(7).unwrap())).unwrap();
    assert_eq!(vals(&a), vals(&b));
    assert_ne!(vals(&a), vals(&c));

    let lo = Array::scalar(0.0f32);
    let hi = Array::scalar(1.0f32);
    let u1 = random::uniform(&lo, &hi, &[64], Dtype::Float32, Some(&k1)).unwrap();
    let u2 = random::uniform(&lo, &hi, &[64], Dtype::Float32, Some(&k1)).unwrap();
    let u3 = random::uniform(&lo, &hi, &[64], Dtype::Float32, Some(&random::key(1).unwrap())).unwrap();
    assert_eq!(vals(&u1), vals(&u2));
    assert_ne!(vals(&u1), vals(&u3));
}

#[test]
fn split_keys_differ_from_each_other_and_are_deterministic() {
    let k = random::key(5).unwrap();
    let ks = random::split(&k, 3).unwrap();
    assert_eq!(ks.shape(), vec![3, 2]);
    let kv = ks.to_vec::<u32>().unwrap();
    assert_eq!(kv, random::split(&random::key(5).unwrap(), 3).unwrap().to_vec::<u32>().unwrap());
    let rows: Vec<&[u32]> = kv.chunks(2).collect();
    assert_ne!(rows[0], rows[1]);
    assert_ne!(rows[1], rows[2]);
    assert_ne!(rows[0], k.to_vec::<u32>().unwrap().as_slice());
    // A row of the split works as a key.
    let sub = mlx::ops::take(&ks, &common::iarr(&[1], &[]), 0).unwrap();
    let x = random::normal(&[8], Dtype::Float32, 0.0, 1.0, Some(&sub)).unwrap();
    assert_eq!(x.shape(), vec![8]);
}

#[test]
fn global_seed_sequence_is_reproducible() {
    // The global key is process-wide; only this test in this binary uses it.
    random::seed(123).unwrap();
    let a = vals(&random::normal(&[16], Dtype::Float32, 0.0, 1.0, None).unwrap());
    let b = vals(&random::normal(&[16], Dtype::Float32, 0.0, 1.0, None).unwrap());
    assert_ne!(a, b, "consecutive draws from the global sequence differ");
    random::seed(123).unwrap();
    let c = vals(&random::normal(&[16], Dtype::Float32, 0.0, 1.0, None).unwrap());
    assert_eq!(a, c);
}

#[test]
fn normal_statistics() {
    let k = random::key(1).unwrap();
    let x = vals(&random::normal(&[N], Dtype::Float32, 2.0, 3.0, Some(&k)).unwrap());
    let (m, v) = mean_var(&x);
    // Standard error of the mean is 3/sqrt(20000) ≈ 0.02; bounds are ~10 sigma.
    assert!((m - 2.0).abs() < 0.2, "mean {m}");
    assert!((v.sqrt() - 3.0).abs() < 0.15, "std {}", v.sqrt());
    let within_one = x.iter().filter(|&&v| (f64::from(v) - 2.0).abs() < 3.0).count() as f64 / x.len() as f64;
    assert!((within_one - 0.6827).abs() < 0.03, "fraction within one sigma {within_one}");
    // Low-precision dtypes.
    let h = random::normal(&[1000], Dtype::Bfloat16, 0.0, 1.0, Some(&k)).unwrap();
    assert_eq!(h.dtype(), Dtype::Bfloat16);
    let (m, _) = mean_var(&vals(&h));
    assert!(m.abs() < 0.3, "bf16 mean {m}");
}

#[test]
fn uniform_statistics() {
    let k = random::key(2).unwrap();
    let x = vals(
        &random::uniform(&Array::scalar(-1.0f32), &Array::scalar(3.0f32), &[N], Dtype::Float32, Some(&k)).unwrap(),
    );
    assert!(x.iter().all(|&v| (-1.0..3.0).contains(&v)), "a sample left [-1, 3)");
    let (m, v) = mean_var(&x);
    assert!((m - 1.0).abs() < 0.1, "mean {m}");
    assert!((v - 16.0 / 12.0).abs() < 0.1, "variance {v}");
    // Each quarter of the range gets about a quarter of the samples.
    for q in 0..4 {
        let lo = -1.0 + q as f32;
        let frac = x.iter().filter(|&&v| v >= lo && v < lo + 1.0).count() as f64 / x.len() as f64;
        assert!((frac - 0.25).abs() < 0.03, "quarter {q}: {frac}");
    }
    // Array bounds broadcast against the shape.
    let lo = arr(&[0.0, 10.0], &[2, 1]);
    let hi = arr(&[1.0, 11.0], &[2, 1]);
    let y = vals(&random::uniform(&lo, &hi, &[2, 100], Dtype::Float32, Some(&k)).unwrap());
    assert!(y[..100].iter().all(|v| (0.0..1.0).contains(v)));
    assert!(y[100..].iter().all(|v| (10.0..11.0).contains(v)));
}

#[test]
fn categorical_statistics() {
    let k = random::key(3).unwrap();
    let p = [0.1f64, 0.2, 0.3, 0.4];
    let logits: Vec<f32> = p.iter().map(|v| v.ln() as f32 + 5.0).collect(); // unnormalised
    let l = arr(&logits, &[1, 4]);
    let l = mlx::ops::broadcast_to(&l, &[N, 4]).unwrap();
    let s = random::categorical(&l, -1, Some(&k)).unwrap();
    assert_eq!(s.shape(), vec![N]);
    let s = s.to_vec::<u32>().unwrap();
    for (c, &want) in p.iter().enumerate() {
        let frac = s.iter().filter(|&&v| v == c as u32).count() as f64 / s.len() as f64;
        assert!((frac - want).abs() < 0.03, "class {c}: {frac} vs {want}");
    }
    // Same key, same draws.
    let again = random::categorical(&l, -1, Some(&k)).unwrap().to_vec::<u32>().unwrap();
    assert_eq!(s, again);
    // A -inf logit is never drawn; one finite logit always is.
    let l = arr(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY], &[1, 3]);
    let l = mlx::ops::broadcast_to(&l, &[500, 3]).unwrap();
    let s = random::categorical(&l, 1, Some(&k)).unwrap().to_vec::<u32>().unwrap();
    assert!(s.iter().all(|&v| v == 1));
    // Along axis 0.
    let s = random::categorical(&arr(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[3, 2]), 0, Some(&k)).unwrap();
    assert_eq!(s.shape(), vec![2]);
}

#[test]
fn bernoulli_and_randint() {
    let k = random::key(4).unwrap();
    let b = random::bernoulli(&Array::scalar(0.3f32), &[N], Some(&k)).unwrap();
    assert_eq!(b.dtype(), Dtype::Bool);
    let frac = b.to_vec::<bool>().unwrap().iter().filter(|&&v| v).count() as f64 / f64::from(N);
    assert!((frac - 0.3).abs() < 0.03, "{frac}");

    let r = random::randint(&Array::scalar(-3i32), &Array::scalar(4i32), &[N], Dtype::Int32, Some(&k)).unwrap();
    let r = r.to_vec::<i32>().unwrap();
    assert!(r.iter().all(|v| (-3..4).contains(v)));
    for v in -3..4 {
        let frac = r.iter().filter(|&&x| x == v).count() as f64 / r.len() as f64;
        assert!((frac - 1.0 / 7.0).abs() < 0.03, "value {v}: {frac}");
    }
}

#[test]
fn random_errors() {
    let k = random::key(0).unwrap();
    expect_err(random::normal(&[4], Dtype::Int32, 0.0, 1.0, Some(&k)), "random_normal");
    expect_err(
        random::uniform(&Array::scalar(0.0f32), &Array::scalar(1.0f32), &[4], Dtype::Int32, Some(&k)),
        "random_uniform",
    );
    expect_err(
        random::uniform(&arr(&[0.0, 0.0, 0.0], &[3]), &Array::scalar(1.0f32), &[4], Dtype::Float32, Some(&k)),
        "random_uniform",
    );
    expect_err(random::categorical(&arr(&[0.0, 0.0], &[1, 2]), 2, Some(&k)), "random_categorical");
    expect_err(
        random::randint(&Array::scalar(0i32), &Array::scalar(4i32), &[4], Dtype::Float32, Some(&k)),
        "random_randint",
    );
    // A key must be a uint32 pair.
    let bad_key = arr(&[1.0, 2.0], &[2]);
    expect_err(random::normal(&[4], Dtype::Float32, 0.0, 1.0, Some(&bad_key)), "random_normal");
    let bad_key = Array::from_vec(&[1u32, 2, 3]).unwrap();
    expect_err(random::normal(&[4], Dtype::Float32, 0.0, 1.0, Some(&bad_key)), "random_normal");
    expect_err(random::split(&bad_key, 2), "random_split");
    expect_err(random::normal(&[-4], Dtype::Float32, 0.0, 1.0, Some(&k)), "random_normal");
}
