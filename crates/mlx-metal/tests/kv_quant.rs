// SPDX-License-Identifier: EUPL-1.2
//! The quantised KV cache (`kv_bits`, `kv_group_size`, `quantized_kv_start`):
//! greedy tokens through the public API (the backend's scheduler, several
//! requests at once so batched rows are covered) equal mlx-lm's with the same
//! settings (goldens by xtask/fixtures/kv_goldens.py) on gemma3-tiny and the
//! real SmolLM2 in bf16 and with float32 activations; the cache's bytes fall
//! by the factor its shapes give; quantised buffers move through every batch
//! operation; bad settings are refused with the option and value named.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;

use inference_core::{
    CancelToken, Completion, ComputeDtype, GenerateSettings, LoadSettings, Message, Registry, TextModel,
};
use mlx::{Array, Dtype, ops};
use mlx_metal::cache::{BatchKvCache, Fetched, KvArray, KvCache, KvQuant, LayerCache};
use parity::{Fixture, KvQuantRun};

const QUESTION: &str = "What is the capital of France?";

/// Held by the tests that run models, so that the one that reads MLX's
/// process-wide memory figures sees only its own buffers come and go.
static MODELS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn models() -> std::sync::MutexGuard<'static, ()> {
    MODELS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The checkpoint's own type (config.json's `torch_dtype`): the goldens and
/// the byte counts here are mlx-lm's defaults, which never cast.
fn checkpoint_dtype(path: &Path) -> ComputeDtype {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
    let name = config["torch_dtype"].as_str().or(config["text_config"]["torch_dtype"].as_str()).unwrap_or("float32");
    name.parse().unwrap()
}

fn load_with(path: &Path, options: &[(&str, String)]) -> inference_core::Result<Arc<dyn TextModel>> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    // Quantised layers stay packed, as mlx-lm keeps them (float32 would dequantise them).
    let mut settings = LoadSettings::default()
        .backend("metal")
        .device(inference_core::Device::Cpu)
        .dtype(checkpoint_dtype(path))
        .backend_option("quantised", "keep");
    for (k, v) in options {
        settings = settings.backend_option(*k, v.clone());
    }
    reg.load_model(path, &settings).map(Arc::from)
}

/// A golden run's options. The prompt cache is off: a request that reuses quantised keys attends
/// to them where the same request cold attends to full-precision ones in its first forward pass
/// (mlx-lm's server does the same), so at 4 bits its tokens may differ from alone; the prompt
/// cache's own tests cover reuse (`tests/prompt_cache.rs`).
fn run_options(run: &KvQuantRun) -> Vec<(&'static str, String)> {
    vec![
        ("kv_bits", run.kv_bits.to_string()),
        ("kv_group_size", run.kv_group_size.to_string()),
        ("quantized_kv_start", run.quantized_kv_start.to_string()),
        ("prefill_step", run.prefill_step_size.to_string()),
        ("prompt_cache_bytes", "0".to_owned()),
    ]
}

fn ids(c: &Completion) -> Vec<u32> {
    c.tokens.iter().map(|t| t.id).collect()
}

/// How a golden's prompt is asked for through the public API.
#[derive(Clone, Copy)]
enum Ask {
    Generate(&'static str),
    Chat(&'static str),
}

fn ask(model: &dyn TextModel, how: Ask, n: usize) -> inference_core::TokenStream {
    let s = GenerateSettings::default().max_tokens(n).ignore_eos(true);
    match how {
        Ask::Generate(p) => model.generate(p, &s, CancelToken::new()),
        Ask::Chat(q) => model.chat(&[Message::user(q)], &s, CancelToken::new()),
    }
    .unwrap_or_else(|e| panic!("{}", e.report()))
}

/// Other prompts that share the batch with the golden's.
const NEIGHBOURS: [&str; 3] = ["Hi", "The quick brown fox jumps over the lazy dog.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"];

/// Every `kv_quant` run of `fixture` through the backend: alone, and (for
/// runs quantised from the start, where a row in a batch converts exactly
/// when it would alone) beside other requests, each of which must also give
/// what it gives alone.
fn check_runs(fixture: &Fixture, how: Ask) {
    let runs = &fixture.golden.kv_quant;
    assert!(!runs.is_empty(), "{}: no kv_quant runs in the golden", fixture.name);
    for run in runs {
        let what = format!("{} {}", fixture.name, run.name);
        let model = load_with(&fixture.model_dir, &run_options(run)).unwrap_or_else(|e| panic!("{what}: {e}"));
        let alone = ask(model.as_ref(), how, run.max_tokens).complete().unwrap();
        let prompt_tokens = alone.metrics.as_ref().map(|m| m.prompt_tokens);
        assert_eq!(prompt_tokens, Some(run.prompt.len()), "{what}: the prompt is not the golden's");
        assert_eq!(ids(&alone), run.tokens, "{what}: greedy tokens against mlx-lm's (margins {:?})", run.margins);
        if run.quantized_kv_start > 0 {
            continue;
        }
        let n = run.max_tokens;
        let solo: Vec<Vec<u32>> =
            NEIGHBOURS.iter().map(|p| ids(&ask(model.as_ref(), Ask::Generate(p), n / 2).complete().unwrap())).collect();
        let first = ask(model.as_ref(), Ask::Generate(NEIGHBOURS[0]), n / 2);
        let mine = ask(model.as_ref(), how, n);
        let rest: Vec<_> = NEIGHBOURS[1..].iter().map(|p| ask(model.as_ref(), Ask::Generate(p), n / 2)).collect();
        assert_eq!(ids(&mine.complete().unwrap()), run.tokens, "{what}: batched greedy tokens against mlx-lm's");
        for (i, s) in std::iter::once(first).chain(rest).enumerate() {
            assert_eq!(ids(&s.complete().unwrap()), solo[i], "{what}: neighbour {i} batched against alone");
        }
        let peak = model.engine_load().map_or(0, |l| l.peak_batch_size);
        assert!(peak >= 2, "{what}: the requests never shared a batch (peak {peak})");
    }
}

#[test]
fn gemma3_tiny_greedy_tokens_equal_mlx_lm_with_a_quantised_cache() {
    let _models = models();
    let fixture = Fixture::load("gemma3-tiny").unwrap();
    check_runs(&fixture, Ask::Generate("Hello world"));
}

#[test]
fn smollm2_greedy_tokens_equal_mlx_lm_with_a_quantised_cache() {
    let _models = models();
    for name in ["smollm2-135m-instruct", "smollm2-135m-instruct-8bit"] {
        if let Some(fixture) = parity::real_fixture(name).unwrap() {
            check_runs(&fixture, Ask::Chat(QUESTION));
        }
    }
}

/// Bytes per position of one layer's keys and values for `heads` KV heads
/// of `dim` features in `bytes`-byte floats: dense, and quantised (packed
/// data plus a scale and a bias per group).
fn expected_bytes(heads: usize, dim: usize, bytes: usize, bits: usize, group: usize) -> (usize, usize) {
    (2 * heads * dim * bytes, 2 * heads * (dim * bits / 8 + 2 * (dim / group) * bytes))
}

#[test]
fn the_cache_shrinks_by_the_factor_its_shapes_give() {
    for (dtype, bytes) in [(Dtype::Bfloat16, 2), (Dtype::Float32, 4)] {
        for bits in [8, 4] {
            let (heads, dim, len) = (3, 64, 300);
            let k = ops::astype(&ops::ones(&[1, heads, len, dim], Dtype::Float32).unwrap(), dtype).unwrap();
            let mut dense = KvCache::new();
            dense.append(&k, &k).unwrap();
            let mut quant = KvCache::new().with_quant(Some(KvQuant::new(bits, 64, 0).unwrap()));
            quant.append(&k, &k).unwrap();
            assert!(!quant.is_quantised(), "an empty cache's first pass stays full precision");
            let one = ops::slice_axis(&k, 2, 0, 1).unwrap();
            dense.append(&one, &one).unwrap();
            assert!(matches!(quant.append(&one, &one).unwrap(), Fetched::Quantised(..)));
            // Both hold 512 positions (two steps of 256).
            let (d, q) = expected_bytes(heads as usize, dim as usize, bytes, bits as usize, 64);
            assert_eq!(dense.nbytes(), 512 * d, "{dtype:?}");
            assert_eq!(quant.nbytes(), 512 * q, "{dtype:?} {bits} bits");
            // e.g. 8 bits over bfloat16: 1/2 + 2·2/(2·64) = 0.53125
            let ratio = quant.nbytes() as f64 / dense.nbytes() as f64;
            let want = bits as f64 / (8.0 * bytes as f64) + 2.0 / 64.0;
            assert!((ratio - want).abs() < 1e-12, "{dtype:?} {bits} bits: {ratio} against {want}");
        }
    }
}

#[test]
fn the_engine_counts_quantised_bytes_per_token() {
    let _models = models();
    // gemma3-tiny: 3 sliding-window layers (full precision) and 1 global one, 1 KV head of 32, bf16.
    let path = common::tiny_model("gemma3-tiny");
    let per_token = |opts: &[(&str, String)]| load_with(&path, opts).unwrap().engine_load().unwrap().kv_bytes_per_token;
    let dense = per_token(&[]);
    let (d, q8) = expected_bytes(1, 32, 2, 8, 32);
    let (_, q4) = expected_bytes(1, 32, 2, 4, 32);
    assert_eq!(dense, 4 * d);
    let group = ("kv_group_size", "32".to_owned());
    assert_eq!(per_token(&[("kv_bits", "8".into()), group.clone()]), 3 * d + q8);
    assert_eq!(per_token(&[("kv_bits", "4".into()), group]), 3 * d + q4);
    // SmolLM2 135M: 30 layers, 3 KV heads of 64, bf16.
    if let Some(path) = common::real_model("smollm2-135m-instruct") {
        let model = |opts: &[(&str, String)]| load_with(&path, opts).unwrap().engine_load().unwrap().kv_bytes_per_token;
        let (d, q8) = expected_bytes(3, 64, 2, 8, 64);
        let (_, q4) = expected_bytes(3, 64, 2, 4, 64);
        assert_eq!(model(&[]), 30 * d);
        assert_eq!(model(&[("kv_bits", "8".into())]), 30 * q8);
        assert_eq!(model(&[("kv_bits", "4".into())]), 30 * q4);
    }
}

#[test]
fn bad_settings_are_refused_with_the_option_named() {
    let _models = models();
    let path = common::tiny_model("gemma3-tiny");
    let refused = |opts: &[(&str, &str)], names: &[&str]| {
        let opts: Vec<(&str, String)> = opts.iter().map(|(k, v)| (*k, v.to_string())).collect();
        let e = load_with(&path, &opts).err().expect("refused").report();
        for n in names {
            assert!(e.contains(n), "{opts:?}: {e:?} lacks {n:?}");
        }
    };
    refused(&[("kv_bits", "3")], &["kv_bits", "\"3\"", "4 or 8"]);
    refused(&[("kv_bits", "eight")], &["kv_bits", "eight"]);
    refused(&[("kv_bits", "8"), ("kv_group_size", "48")], &["kv_group_size", "48"]);
    refused(&[("kv_bits", "8"), ("quantized_kv_start", "-1")], &["quantized_kv_start", "-1"]);
    refused(&[("kv_group_size", "0")], &["kv_group_size", "\"0\""]);
    // gemma3-tiny's head dimension is 32: groups of 64 do not fit it.
    refused(&[("kv_bits", "4")], &["kv_group_size", "64", "head dimension 32"]);
    // qwen3-tiny's is 16, smaller than any group MLX has.
    let e = load_with(&common::tiny_model("qwen3-tiny"), &[("kv_bits", "8".into()), ("kv_group_size", "32".into())]);
    let e = e.err().expect("refused").report();
    assert!(e.contains("kv_group_size") && e.contains("head dimension 16"), "{e}");
    assert!(KvQuant::new(8, 64, 0).is_ok() && KvQuant::new(2, 64, 0).is_err());
}

fn normal(shape: &[i32], seed: u64) -> Array {
    let key = mlx::random::key(seed).unwrap();
    mlx::random::normal(shape, Dtype::Float32, 0.0, 1.0, Some(&key)).unwrap()
}

fn dequantised(a: &KvArray) -> Array {
    match a {
        KvArray::Dense(a) => a.clone(),
        KvArray::Quantised(q) => ops::dequantize(q, Some(Dtype::Float32)).unwrap(),
    }
}

fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    let d = ops::abs(&ops::subtract(a, b).unwrap()).unwrap();
    ops::max_all(&d, false).unwrap().to_vec_f32().unwrap()[0]
}

#[test]
fn batch_moves_keep_quantised_rows() {
    let q = KvQuant::new(8, 32, 0).unwrap();
    // Three rows of different lengths, each prefilled on its own one-row cache then one more token.
    let lens = [5, 9, 3];
    let mut rows: Vec<BatchKvCache> = Vec::new();
    let mut keys: Vec<Array> = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let k = normal(&[1, 2, len + 1, 32], i as u64);
        let mut c = BatchKvCache::new(vec![0]).unwrap().with_quant(Some(q));
        c.append(&ops::slice_axis(&k, 2, 0, len).unwrap(), &ops::slice_axis(&k, 2, 0, len).unwrap()).unwrap();
        let last = ops::slice_axis(&k, 2, len, len + 1).unwrap();
        c.append(&last, &last).unwrap();
        assert!(c.is_quantised(), "row {i} converts at its second pass");
        rows.push(c);
        keys.push(k);
    }
    // A full-precision row (no settings) joins the quantised batch and is quantised as it joins.
    let plain_k = normal(&[1, 2, 4, 32], 7);
    let plain = BatchKvCache::from_row(plain_k.clone(), plain_k.clone(), 4, None).unwrap();
    let mut batch = rows[0].clone();
    batch.extend(&rows[1]).unwrap();
    batch.extend(&plain).unwrap();
    batch.extend(&rows[2]).unwrap();
    assert!(batch.is_quantised());
    assert_eq!(batch.left_padding(), &[4, 0, 6, 6]);
    let mut all = keys.clone();
    all.insert(2, plain_k);
    let check = |b: &BatchKvCache, row: usize, want: &Array| {
        let (k, v, pos) = b.row_parts(row).unwrap();
        assert!(k.is_quantised() && v.is_quantised());
        assert_eq!(pos, want.dim(2).unwrap());
        // 8-bit groups of 32 of a standard normal: within a few hundredths.
        assert!(max_abs_diff(&dequantised(&k), want) < 0.05, "row {row}");
        assert!(b.row(row).is_err(), "a quantised row has no dense keys");
    };
    for (i, want) in all.iter().enumerate() {
        check(&batch, i, want);
    }
    // A decode step for all rows, then the second row leaves.
    let step = normal(&[4, 2, 1, 32], 9);
    assert!(matches!(batch.append(&step, &step).unwrap(), Fetched::Quantised(..)));
    batch.filter(&[0, 2, 3]).unwrap();
    let grown = |k: &Array, r: i32| ops::concatenate(&[k, &ops::slice_axis(&step, 0, r, r + 1).unwrap()], 2).unwrap();
    for (i, (want, r)) in [(&all[0], 0), (&all[2], 2), (&all[3], 3)].into_iter().enumerate() {
        check(&batch, i, &grown(want, r));
    }
    // A row moves out to a cache of its own and back.
    let (k, v, pos) = batch.row_parts(1).unwrap();
    let alone = BatchKvCache::from_row_parts(k, v, pos, None).unwrap();
    check(&alone, 0, &grown(&all[2], 2));
    let mut layer = LayerCache::Batch(alone);
    assert!(matches!(layer.update_and_fetch(&step.index_row(0), &step.index_row(0)).unwrap(), Fetched::Quantised(..)));
    assert!(layer.nbytes() > 0);
}

trait Row {
    fn index_row(&self, r: i32) -> Array;
}

impl Row for Array {
    fn index_row(&self, r: i32) -> Array {
        ops::slice_axis(self, 0, r, r + 1).unwrap()
    }
}

#[test]
fn a_start_keeps_the_cache_full_precision_until_it_is_reached() {
    let q = KvQuant::new(4, 32, 10).unwrap();
    let mut c = KvCache::new().with_quant(Some(q));
    let k = normal(&[1, 1, 1, 32], 1);
    for step in 0..12 {
        let quantised = matches!(c.append(&k, &k).unwrap(), Fetched::Quantised(..));
        // mlx-lm converts after the pass that reaches the start; the next one attends quantised.
        assert_eq!(quantised, step >= 10, "step {step}");
    }
    // Trimming keeps the storage quantised; a dense fetch is refused with the reason.
    assert_eq!(c.trim(3), 3);
    assert!(c.is_quantised() && c.offset() == 9);
    let e = c.keys_and_values().unwrap_err().to_string();
    assert!(e.contains("quantised"), "{e}");
    // Sliding-window caches stay full precision.
    let windowed = BatchKvCache::windowed(vec![0], 4).unwrap().with_quant(Some(q));
    assert_eq!(windowed.quant(), None);
    let fresh = KvQuant::new(8, 64, 0).unwrap().apply(vec![LayerCache::Standard(KvCache::new())]);
    assert!(matches!(&fresh[0], LayerCache::Standard(c) if c.quant().is_some()));
}

/// The longest generation a KV budget admits, in positions, against what
/// bytes per token predict: SmolLM2 135M under 2 MiB, in full precision and
/// at 4 bits from the start (docs/benchmarks.md, "Quantised KV cache").
#[test]
fn a_kv_budget_admits_the_context_bytes_per_token_predict() {
    let _models = models();
    let Some(path) = common::real_model("smollm2-135m-instruct") else { return };
    let budget: usize = 2 << 20;
    for (opts, per_token) in [(vec![], 23_040usize), (vec![("kv_bits", "4"), ("quantized_kv_start", "0")], 6_480)] {
        let mut options: Vec<(&str, String)> = opts.iter().map(|(k, v)| (*k, v.to_string())).collect();
        options.push(("kv_cache_bytes", budget.to_string()));
        let model = load_with(&path, &options).unwrap();
        assert_eq!(model.engine_load().unwrap().kv_bytes_per_token, per_token, "{opts:?}");
        let longest = budget / per_token;
        let prompt = "Count:";
        let s = GenerateSettings::default().ignore_eos(true);
        let first = model.generate(prompt, &s.clone().max_tokens(1), CancelToken::new()).unwrap();
        let prompt_tokens = first.complete().unwrap().metrics.unwrap().prompt_tokens;
        let fits = model.generate(prompt, &s.clone().max_tokens(longest - prompt_tokens), CancelToken::new());
        let done = fits.and_then(|s| s.complete()).unwrap_or_else(|e| panic!("{opts:?}: {}", e.report()));
        assert_eq!(done.tokens.len(), longest - prompt_tokens, "{opts:?}");
        let over = model.generate(prompt, &s.max_tokens(longest - prompt_tokens + 1), CancelToken::new());
        let e = over.and_then(|s| s.complete()).unwrap_err().report();
        assert!(e.contains("kv_cache_bytes"), "{opts:?}: {e}");
        eprintln!("{opts:?}: {per_token} bytes per token, {longest} positions fit {budget} bytes");
    }
}

/// What the caches of a 500-token SmolLM2 prompt hold in MLX's memory, at
/// 16, 8 and 4 bits (the library's loop, quantised from the start): the
/// memory freed when the caches are dropped equals what their shapes give.
#[test]
fn smollm2_cache_memory_falls_by_the_expected_factor() {
    let _models = models();
    use mlx_metal::generate::{LoopOptions, generate};
    use mlx_metal::sample::{Sampler, SamplerConfig};
    let Some(path) = common::real_model("smollm2-135m-instruct") else { return };
    let model = mlx_metal::model::load(&path).unwrap().model;
    let prompt: Vec<u32> = (0..500u32).map(|i| 100 + (i * 7919) % 20_000).collect();
    let sampler = Sampler::new(SamplerConfig::default()).unwrap();
    let opts = LoopOptions { max_tokens: 2, ..LoopOptions::default() };
    let mut freed = Vec::new();
    for quant in [None, Some(KvQuant::new(8, 64, 0).unwrap()), Some(KvQuant::new(4, 64, 0).unwrap())] {
        let mut caches = mlx_metal::cache::with_kv_quant(model.make_cache().unwrap(), quant);
        generate(model.as_ref(), &mut caches, &prompt, &sampler, &opts, &|| false, |_| {
            Ok(std::ops::ControlFlow::Continue(()))
        })
        .unwrap();
        let state: Vec<&Array> = caches.iter().flat_map(LayerCache::state).collect();
        mlx::transforms::eval(&state).unwrap();
        common::settle();
        let held: usize = caches.iter().map(LayerCache::nbytes).sum();
        let before = mlx::memory::active_memory().unwrap();
        drop(caches);
        common::settle();
        let after = mlx::memory::active_memory().unwrap();
        // 512 positions (two steps of 256) of 30 layers, 3 KV heads of 64.
        let bits = quant.map_or(16, |q| q.bits as usize);
        let (d, q) = expected_bytes(3, 64, 2, bits.min(8), 64);
        let want = 512 * 30 * if bits == 16 { d } else { q };
        assert_eq!(held, want, "{bits} bits");
        eprintln!("{bits} bits: the caches held {held} bytes; dropping them freed {}", before - after);
        // Within 1%: MLX's figure is process-wide.
        assert!((before - after).abs_diff(held) * 100 <= held, "{bits} bits: freed {} of {held}", before - after);
        freed.push(before - after);
    }
    let ratios = [freed[1] as f64 / freed[0] as f64, freed[2] as f64 / freed[0] as f64];
    assert!((ratios[0] - 0.53125).abs() < 0.01 && (ratios[1] - 0.28125).abs() < 0.01, "{freed:?}");
}
