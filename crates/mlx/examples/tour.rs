// SPDX-License-Identifier: EUPL-1.2
//! A short tour of MLX from Rust: the device, a transformer-style attention
//! block with fused kernels, quantised matmul against its dense original, a
//! gradient, and matmul throughput. Run it with
//! `cargo run --release -p mlx --example tour`.

use std::time::Instant;

use mlx::Result;
use mlx::fast::{self, AttentionMask, RopeFreqs, RopeOffset};
use mlx::transforms::{Closure, ValueAndGrad};
use mlx::{Array, Device, Dtype, memory, ops, random};

fn main() -> Result<()> {
    let device = Device::best();
    let info = device.info()?;
    println!("MLX {} on {} ({})", mlx::mlx_version(), device, info.name());
    if let Some(bytes) = info.memory_bytes() {
        println!("device memory: {:.1} GiB", bytes as f64 / (1u64 << 30) as f64);
    }
    let _scope = mlx::device::DeviceScope::new(device)?;
    let key = random::key(42)?;
    let keys = ops::split(&random::split(&key, 4)?, 4, 0)?;
    let k = |i: usize| ops::reshape(&keys[i], &[2]);

    // One attention block: [batch 1, heads 8, tokens 64, head_dim 64].
    let (b, h, l, d) = (1, 8, 64, 64);
    let x = random::normal(&[b, l, h * d], Dtype::Float32, 0.0, 1.0, Some(&k(0)?))?;
    let norm_w = ops::ones(&[h * d], Dtype::Float32)?;
    let xn = fast::rms_norm(&x, Some(&norm_w), 1e-6)?;
    let heads = ops::transpose(&ops::reshape(&xn, &[b, l, h, d])?, &[0, 2, 1, 3])?;
    let q = fast::rope(&heads, d, false, RopeFreqs::Base(10_000.0), 1.0, RopeOffset::Fixed(0))?;
    let out = fast::scaled_dot_product_attention(&q, &q, &heads, 1.0 / (d as f32).sqrt(), AttentionMask::Causal, None)?;
    out.eval()?;
    println!("attention over {l} tokens × {h} heads: output {:?}", out.shape());

    // Quantised weights: 4-bit, group 64, against the dense original.
    let w = random::normal(&[512, 512], Dtype::Float32, 0.0, 0.02, Some(&k(1)?))?;
    let v = random::normal(&[1, 512], Dtype::Float32, 0.0, 1.0, Some(&k(2)?))?;
    let dense = ops::matmul(&v, &ops::transpose(&w, &[1, 0])?)?;
    for bits in [8, 4] {
        let q = ops::quantize(&w, 64, bits)?;
        let approx = ops::quantized_matmul(&v, &q, true)?;
        let err = ops::divide(
            &ops::sqrt(&ops::mean_all(&ops::square(&ops::subtract(&approx, &dense)?)?, false)?)?,
            &ops::sqrt(&ops::mean_all(&ops::square(&dense)?, false)?)?,
        )?;
        println!("{bits}-bit quantised matmul: relative RMS error {:.4}", err.item::<f32>()?);
    }

    // A gradient through a Rust closure: d/dw of mean((x w)²) at w.
    let xs = random::normal(&[16, 8], Dtype::Float32, 0.0, 1.0, Some(&k(3)?))?;
    let loss = Closure::new(move |args: &[Array]| {
        Ok(vec![ops::mean_all(&ops::square(&ops::matmul(&xs, &args[0])?)?, false)?])
    })?;
    let w0 = ops::ones(&[8, 1], Dtype::Float32)?;
    let (values, grads) = ValueAndGrad::new(&loss, &[0])?.call(&[&w0])?;
    println!("loss {:.4}, gradient norm {:.4}", values[0].item::<f32>()?, {
        let g = &grads[0];
        ops::sqrt(&ops::sum_all(&ops::square(g)?, false)?)?.item::<f32>()?
    });

    // Matmul throughput: float32 runs on the BLAS below (on Linux, the OpenBLAS
    // `cargo xtask setup` fetched, linked ahead of MLX's reference BLAS).
    println!("BLAS: {}", mlx::blas::info().describe());
    for dtype in [Dtype::Float32, Dtype::Bfloat16] {
        let n = 512;
        let a = ops::astype(&random::normal(&[n, n], Dtype::Float32, 0.0, 1.0, None)?, dtype)?;
        ops::matmul(&a, &a)?.eval()?;
        let reps = 10;
        let start = Instant::now();
        for _ in 0..reps {
            ops::matmul(&a, &a)?.eval()?;
        }
        let secs = start.elapsed().as_secs_f64();
        let gflops = 2.0 * f64::from(n).powi(3) * f64::from(reps) / secs / 1e9;
        println!("{dtype} {n}×{n} matmul: {gflops:.1} GFLOP/s");
    }
    let stats = memory::stats()?;
    println!(
        "MLX memory: active {} KiB, peak {} KiB, cache {} KiB",
        stats.active / 1024,
        stats.peak / 1024,
        stats.cache / 1024
    );
    Ok(())
}
