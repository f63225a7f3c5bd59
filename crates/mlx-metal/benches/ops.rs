// SPDX-License-Identifier: EUPL-1.2
//! Criterion micro-benchmarks of the ops a decode step spends its time in, and
//! of sampling over a real vocabulary size.
//!
//! `cargo bench -p mlx-metal --bench ops` (add `-- <filter>` for one group).
//! Every iteration builds the op's graph and evaluates it, so the figures
//! include our per-op host overhead (FFI, handle management) as well as MLX's
//! kernel time; `graph_only` measures the host side alone. Runs on MLX's
//! default device (the GPU where there is one).

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mlx::array::{Array, Dtype};
use mlx::fast::{self, AttentionMask, RopeFreqs, RopeOffset};
use mlx::ops;
use mlx::random;
use mlx_metal::cache::KvCache;
use mlx_metal::sample::{Sampler, SamplerConfig};

fn normal(shape: &[i32], dtype: Dtype, seed: u64) -> Array {
    let key = random::key(seed).unwrap();
    let a = random::normal(shape, dtype, 0.0, 1.0, Some(&key)).unwrap();
    a.eval().unwrap();
    a
}

fn matmuls(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    // One decode token through a 2048 × 2048 projection, dense and 4-bit.
    let x = normal(&[1, 2048], Dtype::Float32, 1);
    let w = normal(&[2048, 2048], Dtype::Float32, 2);
    let wt = ops::transpose(&w, &[1, 0]).unwrap();
    g.bench_function("dense_1x2048x2048_f32", |b| b.iter(|| ops::matmul(&x, &wt).unwrap().eval().unwrap()));
    let q = ops::quantize(&w, 64, 4).unwrap();
    q.weight.eval().unwrap();
    q.scales.eval().unwrap();
    g.bench_function("q4_1x2048x2048", |b| b.iter(|| ops::quantized_matmul(&x, &q, true).unwrap().eval().unwrap()));
    // A 128-token prefill through the same projection.
    let xs = normal(&[128, 2048], Dtype::Float32, 3);
    g.bench_function("q4_128x2048x2048", |b| b.iter(|| ops::quantized_matmul(&xs, &q, true).unwrap().eval().unwrap()));
    g.finish();
}

fn fused(c: &mut Criterion) {
    let mut g = c.benchmark_group("fast");
    let x = normal(&[1, 1, 2048], Dtype::Float32, 4);
    let w = normal(&[2048], Dtype::Float32, 5);
    g.bench_function("rms_norm_2048", |b| b.iter(|| fast::rms_norm(&x, Some(&w), 1e-6).unwrap().eval().unwrap()));
    let q = normal(&[1, 16, 1, 128], Dtype::Float32, 6);
    g.bench_function("rope_16x128", |b| {
        b.iter(|| {
            fast::rope(&q, 128, false, RopeFreqs::Base(10_000.0), 1.0, RopeOffset::Fixed(700)).unwrap().eval().unwrap()
        })
    });
    for keys in [256, 2048] {
        let k = normal(&[1, 8, keys, 128], Dtype::Float32, 7);
        let v = normal(&[1, 8, keys, 128], Dtype::Float32, 8);
        g.bench_with_input(BenchmarkId::new("sdpa_decode_16q_8kv", keys), &keys, |b, _| {
            b.iter(|| {
                fast::scaled_dot_product_attention(&q, &k, &v, 0.088, AttentionMask::None, None)
                    .unwrap()
                    .eval()
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn cache(c: &mut Criterion) {
    let mut g = c.benchmark_group("kv_cache");
    let k = normal(&[1, 8, 1, 128], Dtype::Float32, 9);
    g.bench_function("append_512_tokens", |b| {
        b.iter(|| {
            let mut cache = KvCache::new();
            for _ in 0..512 {
                let (keys, _) = cache.update_and_fetch(&k, &k).unwrap();
                keys.eval().unwrap();
            }
        })
    });
    g.finish();
}

fn sampling(c: &mut Criterion) {
    let mut g = c.benchmark_group("sample");
    // Qwen 3's vocabulary.
    let logits = normal(&[1, 151_936], Dtype::Float32, 10);
    let configs = [
        ("greedy", SamplerConfig::default()),
        ("temperature", SamplerConfig { temperature: 0.8, ..SamplerConfig::default() }),
        ("top_p", SamplerConfig { temperature: 0.8, top_p: 0.9, ..SamplerConfig::default() }),
        ("top_k", SamplerConfig { temperature: 0.8, top_k: 40, ..SamplerConfig::default() }),
        ("min_p", SamplerConfig { temperature: 0.8, min_p: 0.05, ..SamplerConfig::default() }),
    ];
    for (name, cfg) in configs {
        let sampler = Sampler::new(cfg).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let lp = Sampler::logprobs(&logits).unwrap();
                sampler.sample(&lp).unwrap().eval().unwrap()
            })
        });
    }
    let history = Array::from_vec(&(0..64).collect::<Vec<i32>>()).unwrap();
    let penalty = Sampler::new(SamplerConfig {
        repetition_penalty: 1.1,
        repetition_context_size: 64,
        ..SamplerConfig::default()
    })
    .unwrap();
    g.bench_function("repetition_penalty_64", |b| {
        b.iter(|| penalty.process(&logits, &history).unwrap().eval().unwrap())
    });
    g.finish();
}

fn graph_only(c: &mut Criterion) {
    // Host cost of building a small graph without evaluating it: what every
    // op costs us before MLX does any work.
    let x = normal(&[1, 2048], Dtype::Float32, 11);
    c.bench_function("graph_only_10_ops", |b| {
        b.iter(|| {
            let mut y = x.clone();
            for _ in 0..10 {
                y = ops::multiply_scalar(&y, 1.0001).unwrap();
            }
            y
        })
    });
}

criterion_group!(benches, matmuls, fused, cache, sampling, graph_only);
criterion_main!(benches);
