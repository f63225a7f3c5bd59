// SPDX-License-Identifier: EUPL-1.2
//! Per-shape timing of 4-bit matrix products for a few rows of x (a batch's
//! decode step): MLX's own kernels against ours (`csrc/mlxs_kernels.cpp`),
//! for Llama-3.1-8B's projection shapes and 1 to 32 rows. Made for the CUDA
//! machine (on a CPU the two are the same code). Run it with
//! `cargo run --release -p mlx --example qmm_rows [-- ROWS,ROWS,...]`.
//!
//! Each measurement evaluates one product with each of several copies of the
//! weights (at least 256 MB in all, so that they come from memory rather than
//! the L2 cache) in one graph, and reports the time of one product: the
//! median of 7 after 2 warm-ups, so the host's launch cost is spread over the
//! copies. The last column is ours for these rows over ours for one row: what
//! a batch costs against a single stream.

use std::time::Instant;

use mlx::fast::{CustomKernels, custom_kernels, set_custom_kernels};
use mlx::transforms::eval;
use mlx::{Array, Device, Dtype, Result, ops, random};

/// Llama-3.1-8B's projections: (name, output features N, input features K).
const SHAPES: [(&str, i32, i32); 5] = [
    ("q/o 4096x4096", 4096, 4096),
    ("k/v 1024x4096", 1024, 4096),
    ("gate/up 14336x4096", 14336, 4096),
    ("down 4096x14336", 4096, 14336),
    ("head 128256x4096", 128256, 4096),
];

fn time_products(xs: &Array, weights: &[ops::Quantized]) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..9 {
        let t0 = Instant::now();
        let outs: Vec<Array> = weights.iter().map(|q| ops::quantized_matmul(xs, q, true)).collect::<Result<_>>()?;
        eval(&outs.iter().collect::<Vec<_>>())?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64() / weights.len() as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    let rows: Vec<i32> = match std::env::args().nth(1) {
        Some(list) => {
            list.split(',').map(|r| r.trim().parse().expect("rows: a comma-separated list of numbers")).collect()
        }
        None => vec![1, 2, 4, 8, 16, 32],
    };
    let device = Device::best();
    let _scope = mlx::device::DeviceScope::new(device)?;
    println!("MLX {} on {} ({})", mlx::mlx_version(), device, device.info()?.name());
    let before = custom_kernels();
    println!("| shape | rows | MLX us | ours us | MLX / ours | ours / ours at 1 row |");
    println!("|---|---|---|---|---|---|");
    for (s, &(name, n, k)) in SHAPES.iter().enumerate() {
        let bytes = n as f64 * k as f64 * (0.5 + 4.0 / 64.0);
        let copies = ((256e6 / bytes).ceil() as usize).clamp(2, 64);
        let mut weights = Vec::with_capacity(copies);
        for c in 0..copies {
            let key = random::key(1000 * s as u64 + c as u64)?;
            let w = ops::astype(&random::normal(&[n, k], Dtype::Float32, 0.0, 0.02, Some(&key))?, Dtype::Bfloat16)?;
            let q = ops::quantize(&w, 64, 4)?;
            eval(&[&q.weight, &q.scales])?;
            weights.push(q);
        }
        let mut one_row = None;
        for &m in &rows {
            let key = random::key(7 + m as u64)?;
            let x = ops::astype(&random::normal(&[m, k], Dtype::Float32, 0.0, 1.0, Some(&key))?, Dtype::Bfloat16)?;
            eval(&[&x])?;
            set_custom_kernels(CustomKernels::Off);
            let theirs = time_products(&x, &weights)?;
            set_custom_kernels(CustomKernels::Always);
            let ours = time_products(&x, &weights)?;
            let base = *one_row.get_or_insert(if m == 1 { ours } else { f64::NAN });
            println!(
                "| {name} | {m} | {:.1} | {:.1} | {:.2} | {:.2} |",
                theirs * 1e6,
                ours * 1e6,
                theirs / ours,
                ours / base
            );
        }
    }
    set_custom_kernels(before);
    Ok(())
}
