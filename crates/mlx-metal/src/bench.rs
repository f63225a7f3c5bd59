// SPDX-License-Identifier: EUPL-1.2
//! The engine's benchmark, shared by `mlxr bench` and the `bench` example (which
//! `cargo xtask bench` drives against mlx-lm).
//!
//! It measures the engine itself: `model::load`, `make_cache` and `generate::generate` with a
//! greedy sampler, on the thread that loaded the model, fed the same pseudo-random token ids as
//! mlx-lm's side (`xtask/bench/mlxlm_bench.py`; both follow `xtask/bench/common.py`). Each
//! generation runs to `decode` tokens (the loop has no notion of EOS; it stops at the count).
//! Per prompt length, `warmup` runs come first and are not counted; the medians are over `runs`.
//!
//! Then, when `public` is set, the same runs through the public API (inference-core's
//! `TextModel` over [`MetalModel`]: its engine thread, channel and token stream, the streaming
//! detokeniser), which shows what that plumbing costs. That path takes text, so it only runs when
//! the model's tokeniser turns the ids into text and back unchanged (the bench models of
//! `xtask/bench/make_model.py` do); otherwise the report says why it was skipped.
//!
//! The report's schema, `mlxr-bench/1`, is described in docs/benchmarks.md.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use inference_core::{CancelToken, ComputeDtype, GenerateSettings, LoadSettings, TextModel};
use serde_json::{Value, json};

use crate::MetalModel;
use crate::cache::LayerCache;
use crate::generate::{self, LoopOptions};
use crate::model::dtype::QuantisedPolicy;
use crate::model::{self, LanguageModel};
use crate::sample::{Sampler, SamplerConfig};
use mlx::{Array, Device, memory};

/// The report's schema name.
pub const SCHEMA: &str = "mlxr-bench/1";

/// Any failure of a benchmark run.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// The model directory.
    pub model: PathBuf,
    /// Prompt lengths in tokens.
    pub prompts: Vec<usize>,
    /// Tokens to decode per run (at least 2: the decode rate needs two tokens).
    pub decode: usize,
    /// Measured runs per prompt length.
    pub runs: usize,
    /// Unmeasured runs before them.
    pub warmup: usize,
    /// Seed of the pseudo-random prompt ids.
    pub seed: u64,
    /// Prefill chunk size.
    pub prefill_step: usize,
    /// Also measure through the public API.
    pub public: bool,
    /// The compute type both sides load the model in (`auto` by default, as `mlxr` does).
    pub dtype: ComputeDtype,
    /// What happens to a quantised checkpoint's layers (the backend option `quantised`).
    pub quantised: QuantisedPolicy,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            prompts: vec![128, 512, 2048],
            decode: 256,
            runs: 3,
            warmup: 1,
            seed: 0,
            prefill_step: generate::PREFILL_STEP,
            public: true,
            dtype: ComputeDtype::Auto,
            quantised: QuantisedPolicy::Auto,
        }
    }
}

impl BenchOptions {
    /// Checks the counts.
    ///
    /// # Errors
    ///
    /// A message naming the option out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.decode < 2 {
            return Err("decode must be at least 2 (the decode rate needs two tokens)".into());
        }
        if self.runs < 1 || self.prompts.is_empty() || self.prompts.contains(&0) || self.prefill_step == 0 {
            return Err("runs, prefill-step and every prompt length must be at least 1".into());
        }
        Ok(())
    }
}

/// `n` pseudo-random ids in `[0, vocab)`: SplitMix64 seeded from `(seed, n)`, as in
/// `xtask/bench/common.py`.
pub fn prompt_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut state = seed.wrapping_mul(GOLDEN).wrapping_add(n as u64);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(GOLDEN);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z % vocab as u64) as u32
        })
        .collect()
}

/// FNV-1a 64 over the ids as little-endian u32, as 16 hex digits (`common.fingerprint`).
pub fn fingerprint(ids: &[u32]) -> String {
    format!("{:016x}", crate::fnv1a64(ids.iter().flat_map(|id| id.to_le_bytes())))
}

/// One measured generation: the call's start, each token's arrival, the generated ids.
struct Timed {
    start: Instant,
    times: Vec<Instant>,
    ids: Vec<u32>,
    peak_memory: usize,
}

/// One run's record, as `common.run_record` makes it.
fn run_record(prompt_tokens: usize, t: &Timed) -> Value {
    let n = t.times.len();
    let ttft = t.times.first().map_or(0.0, |f| (*f - t.start).as_secs_f64());
    let decode = if n > 1 { (t.times[n - 1] - t.times[0]).as_secs_f64() } else { 0.0 };
    json!({
        "ttft_s": ttft,
        "prefill_tok_s": if ttft > 0.0 { Some(prompt_tokens as f64 / ttft) } else { None },
        "decode_s": decode,
        "decode_tok_s": if decode > 0.0 { Some((n - 1) as f64 / decode) } else { None },
        "generated_tokens": n,
        "peak_memory_bytes": t.peak_memory,
    })
}

const METRICS: [&str; 5] = ["ttft_s", "prefill_tok_s", "decode_s", "decode_tok_s", "peak_memory_bytes"];

/// Python's `statistics.median`: the middle value, or the mean of the two middle ones.
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len().is_multiple_of(2) { (v[m - 1] + v[m]) / 2.0 } else { v[m] })
}

fn medians(runs: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    for m in METRICS {
        let med = median(runs.iter().filter_map(|r| r[m].as_f64()).collect());
        let v = match (m, med) {
            (_, None) => Value::Null,
            ("peak_memory_bytes", Some(x)) => json!(x as u64),
            (_, Some(x)) => json!(x),
        };
        out.insert(m.to_string(), v);
    }
    Value::Object(out)
}

/// Runs `one` `warmup` times, then `runs` times, and makes the prompt's result.
fn measure(
    label: &str,
    ids: &[u32],
    o: &BenchOptions,
    progress: &mut dyn FnMut(&str),
    mut one: impl FnMut(&[u32]) -> Result<Timed, BoxError>,
) -> Result<Value, BoxError> {
    for _ in 0..o.warmup {
        one(ids)?;
    }
    let mut runs = Vec::with_capacity(o.runs);
    let mut last_ids = Vec::new();
    for _ in 0..o.runs {
        let t = one(ids)?;
        runs.push(run_record(ids.len(), &t));
        last_ids = t.ids;
    }
    let med = medians(&runs);
    let f = |k: &str| med[k].as_f64().unwrap_or(f64::NAN);
    progress(&format!(
        "{label:<12} prompt {:5}: ttft {:9.1} ms, prefill {:10.1} tok/s, decode {:8.1} tok/s, peak {:.2} GB",
        ids.len(),
        f("ttft_s") * 1e3,
        f("prefill_tok_s"),
        f("decode_tok_s"),
        f("peak_memory_bytes") / 1e9
    ));
    Ok(json!({
        "prompt_tokens": ids.len(),
        "ids_fingerprint": fingerprint(ids),
        "runs": runs,
        "median": med,
        "generated_ids": last_ids,
    }))
}

/// The engine's loop, directly: fresh caches, greedy sampling, every token timed.
fn engine_run(model: &dyn LanguageModel, ids: &[u32], o: &BenchOptions, sampler: &Sampler) -> Result<Timed, BoxError> {
    let opts = LoopOptions { max_tokens: o.decode, prefill_step: o.prefill_step };
    let mut times = Vec::with_capacity(o.decode);
    let mut out = Vec::with_capacity(o.decode);
    memory::clear_cache()?;
    // Like generate_step, which makes its caches inside the timed call.
    let start = Instant::now();
    let mut caches: Vec<LayerCache> = model.make_cache()?;
    let stats = generate::generate(model, &mut caches, ids, sampler, &opts, &|| false, |step| {
        times.push(Instant::now());
        out.push(step.id);
        Ok(ControlFlow::Continue(()))
    })?;
    drop(caches);
    Ok(Timed { start, times, ids: out, peak_memory: stats.peak_memory })
}

/// The same through the public API: text in (which the tokeniser turns back into `ids`), a
/// token stream out.
fn public_run(llm: &MetalModel, text: &str, o: &BenchOptions) -> Result<Timed, BoxError> {
    let settings = GenerateSettings { max_tokens: o.decode, ignore_eos: true, ..GenerateSettings::default() };
    let mut times = Vec::with_capacity(o.decode);
    let mut out = Vec::with_capacity(o.decode);
    let start = Instant::now();
    for token in llm.generate(text, &settings, CancelToken::new())? {
        let token = token?;
        times.push(Instant::now());
        out.push(token.id);
    }
    let peak_memory = llm.metrics().peak_memory_bytes as usize;
    Ok(Timed { start, times, ids: out, peak_memory })
}

fn settings_json(o: &BenchOptions) -> Value {
    json!({
        "prompts": o.prompts,
        "decode_tokens": o.decode,
        "runs": o.runs,
        "warmup": o.warmup,
        "seed": o.seed,
        "prefill_step": o.prefill_step,
        "dtype": o.dtype.as_str(),
        "quantised": o.quantised.as_str(),
    })
}

/// The public API's side, or why it could not run.
fn public_side(
    o: &BenchOptions,
    vocab: usize,
    base: &Value,
    progress: &mut dyn FnMut(&str),
) -> Result<Value, BoxError> {
    crate::register();
    let t0 = Instant::now();
    let settings = LoadSettings::default().dtype(o.dtype).backend_option("quantised", o.quantised.as_str());
    let llm = MetalModel::load(&o.model, &settings)?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut results = Vec::new();
    for &n in &o.prompts {
        let ids = prompt_ids(n, vocab, o.seed);
        let text = llm.tokenizer().decode(&ids, false)?;
        let back = llm.tokenizer().encode_prompt(&text)?;
        if back != ids {
            let reason = "the tokeniser does not turn the prompt ids into text and back unchanged \
                          (use a model from xtask/bench/make_model.py)";
            progress(&format!("public API: skipped: {reason}"));
            return Ok(json!({ "engine": "ours-public", "skipped": reason }));
        }
        results.push(measure("ours-public", &ids, o, progress, |_| public_run(&llm, &text, o))?);
    }
    llm.close()?;
    let mut side = base.clone();
    side["engine"] = json!("ours-public");
    side["load_s"] = json!(load_s);
    side["ready_s"] = Value::Null;
    side["results"] = json!(results);
    Ok(side)
}

/// Runs the benchmark that `o` describes and returns the report (schema [`SCHEMA`]); each
/// prompt length's summary line goes to `progress` as it is measured.
///
/// # Errors
///
/// Invalid options, or whatever fails while loading the model or generating.
pub fn run(o: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Value, BoxError> {
    o.validate()?;

    let t0 = Instant::now();
    let policy = model::dtype::DtypePolicy::from_setting(o.dtype, Device::mlx_default()?);
    let loaded = model::load_with_quantised(&o.model, None, policy, o.quantised)?;
    let load_s = t0.elapsed().as_secs_f64();
    // Loading is lazy in MLX: the first forward pass reads the weights. "Ready" is load plus one
    // forward pass of one token, as mlx-lm's side measures it.
    {
        let mut caches = loaded.model.make_cache()?;
        let logits = loaded.model.forward(&Array::from_slice(&[0i32], &[1, 1])?, &mut caches)?;
        logits.eval()?;
    }
    let ready_s = t0.elapsed().as_secs_f64();
    let desc = loaded.model.description().clone();
    if let Some(context) = desc.context_length
        && let Some(&n) = o.prompts.iter().find(|&&n| n.saturating_add(o.decode) > context)
    {
        return Err(format!(
            "a prompt of {n} tokens and {} decoded need {} positions; the model's context is {context}",
            o.decode,
            n.saturating_add(o.decode)
        )
        .into());
    }
    let loaded_dtype = loaded.compute.dtype.name();
    let dtype_reason = loaded.compute.reason.clone();
    let vocab = desc.vocab_size;
    let sampler = Sampler::new(SamplerConfig::default())?;

    let mut results = Vec::new();
    for &n in &o.prompts {
        let ids = prompt_ids(n, vocab, o.seed);
        results.push(measure("ours", &ids, o, progress, |ids| engine_run(loaded.model.as_ref(), ids, o, &sampler))?);
    }
    drop(loaded);
    memory::clear_cache()?;

    let device = Device::mlx_default()?;
    let device_info = device.info().map(|i| json!(i.properties)).unwrap_or(Value::Null);
    let mut doc = json!({
        "schema": SCHEMA,
        "engine": "ours",
        "versions": {
            "mlx": mlx::mlx_version(),
            "engine": env!("CARGO_PKG_VERSION"),
        },
        "device": device.to_string(),
        "device_info": device_info,
        "custom_kernels": format!("{:?}", mlx::fast::custom_kernels()).to_lowercase(),
        "model": {
            "dir": o.model.display().to_string(),
            "architecture": desc.architecture,
            "num_layers": desc.num_layers,
            "vocab_size": vocab,
            "quant_bits": desc.quant_bits,
            "quant_group": desc.quant_group,
            "compute_dtype": loaded_dtype,
            "compute_dtype_reason": dtype_reason,
        },
        "settings": settings_json(o),
        "load_s": load_s,
        "ready_s": ready_s,
        "results": results,
    });
    doc["public"] = if o.public { public_side(o, vocab, &doc, progress)? } else { Value::Null };
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_ids_and_fingerprint_follow_common_py() {
        let ids = prompt_ids(8, 1000, 0);
        assert_eq!(ids.len(), 8);
        assert!(ids.iter().all(|&i| i < 1000));
        assert_eq!(ids, prompt_ids(8, 1000, 0), "deterministic");
        assert_ne!(ids, prompt_ids(8, 1000, 1), "the seed matters");
        assert_eq!(fingerprint(&[]), "cbf29ce484222325", "FNV-1a's offset basis");
        assert_eq!(fingerprint(&ids).len(), 16);
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(BenchOptions::default().validate().is_ok());
        let o = BenchOptions { decode: 1, ..BenchOptions::default() };
        assert!(o.validate().unwrap_err().starts_with("decode must be at least 2"));
        let o = BenchOptions { prompts: vec![16, 0], ..BenchOptions::default() };
        assert!(o.validate().is_err());
        let o = BenchOptions { runs: 0, ..BenchOptions::default() };
        assert!(o.validate().is_err());
    }
}
