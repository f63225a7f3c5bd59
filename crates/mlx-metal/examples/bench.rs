// SPDX-License-Identifier: EUPL-1.2
//! Our side of the benchmark: the engine's generation loop on a model directory.
//!
//! ```sh
//! cargo run --release -p mlx-metal --example bench -- --model DIR \
//!     [--prompts 128,512,2048] [--decode 256] [--runs 3] [--warmup 1] [--seed 0] \
//!     [--prefill-step 2048] [--no-public] [--json OUT]
//! ```
//!
//! It measures the engine itself: `model::load`, `make_cache` and `generate::generate` with a
//! greedy sampler, on the thread that loaded the model, fed the same pseudo-random token ids as
//! mlx-lm's side (`xtask/bench/mlxlm_bench.py`; both follow `xtask/bench/common.py`). Each
//! generation runs to `--decode` tokens (the loop has no notion of EOS; it stops at the count).
//! Per prompt length, `--warmup` runs come first and are not counted; the medians are over
//! `--runs`.
//!
//! Then, unless `--no-public`, the same runs through the public API (inference-core's
//! `TextModel` over [`mlx_metal::MetalModel`]: its engine thread, channel and token stream, the
//! streaming detokeniser), which shows what that plumbing costs. That path takes text, so it only
//! runs when the model's tokeniser turns the ids into text and back unchanged (the bench models
//! of `xtask/bench/make_model.py` do); otherwise the report says why it was skipped.
//!
//! The JSON (schema `mlxr-bench/1`, described in docs/benchmarks.md) goes to `--json`, or stdout;
//! a summary goes to stderr. The driver `xtask/bench/run_all.py` runs this and mlx-lm's side and
//! compares them.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use inference_core::{CancelToken, GenerateSettings, LoadSettings, TextModel};
use mlx_metal::cache::LayerCache;
use mlx_metal::generate::{self, LoopOptions};
use mlx_metal::model::{self, LanguageModel};
use mlx_metal::sample::{Sampler, SamplerConfig};
use mlx_metal::{Array, Device, MetalModel, memory};
use serde_json::{Value, json};

const SCHEMA: &str = "mlxr-bench/1";

type BoxError = Box<dyn std::error::Error>;

#[derive(Debug)]
struct Options {
    model: PathBuf,
    prompts: Vec<usize>,
    decode: usize,
    runs: usize,
    warmup: usize,
    seed: u64,
    prefill_step: usize,
    public: bool,
    json: Option<PathBuf>,
}

const USAGE: &str = "usage: bench --model DIR [--prompts 128,512,2048] [--decode 256] [--runs 3] [--warmup 1] \
                     [--seed 0] [--prefill-step 2048] [--no-public] [--json OUT]";

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        model: PathBuf::new(),
        prompts: vec![128, 512, 2048],
        decode: 256,
        runs: 3,
        warmup: 1,
        seed: 0,
        prefill_step: generate::PREFILL_STEP,
        public: true,
        json: None,
    };
    let mut model = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        let num = |name: &str, v: String| v.parse::<usize>().map_err(|_| format!("{name}: {v:?} is not a number"));
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value("--model")?)),
            "--prompts" => {
                let v = value("--prompts")?;
                o.prompts = v
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| num("--prompts", s.trim().into()))
                    .collect::<Result<_, _>>()?;
            }
            "--decode" => o.decode = num("--decode", value("--decode")?)?,
            "--runs" => o.runs = num("--runs", value("--runs")?)?,
            "--warmup" => o.warmup = num("--warmup", value("--warmup")?)?,
            "--seed" => o.seed = num("--seed", value("--seed")?)? as u64,
            "--prefill-step" => o.prefill_step = num("--prefill-step", value("--prefill-step")?)?,
            "--json" => o.json = Some(PathBuf::from(value("--json")?)),
            "--no-public" => o.public = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    o.model = model.ok_or_else(|| format!("--model is required\n{USAGE}"))?;
    if o.decode < 2 {
        return Err("--decode must be at least 2 (the decode rate needs two tokens)".into());
    }
    if o.runs < 1 || o.prompts.is_empty() || o.prompts.contains(&0) || o.prefill_step == 0 {
        return Err("--runs, --prefill-step and every prompt length must be at least 1".into());
    }
    Ok(o)
}

/// `n` pseudo-random ids in `[0, vocab)`: SplitMix64 seeded from `(seed, n)`, as in
/// `xtask/bench/common.py`.
fn prompt_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
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
fn fingerprint(ids: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in ids {
        for b in id.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
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
    o: &Options,
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
    eprintln!(
        "{label:<12} prompt {:5}: ttft {:9.1} ms, prefill {:10.1} tok/s, decode {:8.1} tok/s, peak {:.2} GB",
        ids.len(),
        f("ttft_s") * 1e3,
        f("prefill_tok_s"),
        f("decode_tok_s"),
        f("peak_memory_bytes") / 1e9
    );
    Ok(json!({
        "prompt_tokens": ids.len(),
        "ids_fingerprint": fingerprint(ids),
        "runs": runs,
        "median": med,
        "generated_ids": last_ids,
    }))
}

/// The engine's loop, directly: fresh caches, greedy sampling, every token timed.
fn engine_run(model: &dyn LanguageModel, ids: &[u32], o: &Options, sampler: &Sampler) -> Result<Timed, BoxError> {
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
fn public_run(llm: &MetalModel, text: &str, o: &Options) -> Result<Timed, BoxError> {
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

fn settings_json(o: &Options) -> Value {
    json!({
        "prompts": o.prompts,
        "decode_tokens": o.decode,
        "runs": o.runs,
        "warmup": o.warmup,
        "seed": o.seed,
        "prefill_step": o.prefill_step,
    })
}

/// The public API's side, or why it could not run.
fn public_side(o: &Options, vocab: usize, base: &Value) -> Result<Value, BoxError> {
    mlx_metal::register();
    let t0 = Instant::now();
    let llm = MetalModel::load(&o.model, &LoadSettings::default())?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut results = Vec::new();
    for &n in &o.prompts {
        let ids = prompt_ids(n, vocab, o.seed);
        let text = llm.tokenizer().decode(&ids, false)?;
        let back = llm.tokenizer().encode_prompt(&text)?;
        if back != ids {
            let reason = "the tokeniser does not turn the prompt ids into text and back unchanged \
                          (use a model from xtask/bench/make_model.py)";
            eprintln!("public API: skipped: {reason}");
            return Ok(json!({ "engine": "ours-public", "skipped": reason }));
        }
        results.push(measure("ours-public", &ids, o, |_| public_run(&llm, &text, o))?);
    }
    llm.close()?;
    let mut side = base.clone();
    side["engine"] = json!("ours-public");
    side["load_s"] = json!(load_s);
    side["ready_s"] = Value::Null;
    side["results"] = json!(results);
    Ok(side)
}

fn run() -> Result<(), BoxError> {
    let o = parse_args()?;

    let t0 = Instant::now();
    let loaded = model::load(&o.model)?;
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
    let vocab = desc.vocab_size;
    let sampler = Sampler::new(SamplerConfig::default())?;

    let mut results = Vec::new();
    for &n in &o.prompts {
        let ids = prompt_ids(n, vocab, o.seed);
        results.push(measure("ours", &ids, &o, |ids| engine_run(loaded.model.as_ref(), ids, &o, &sampler))?);
    }
    drop(loaded);
    memory::clear_cache()?;

    let device = Device::mlx_default()?;
    let device_info = device.info().map(|i| json!(i.properties)).unwrap_or(Value::Null);
    let mut doc = json!({
        "schema": SCHEMA,
        "engine": "ours",
        "versions": {
            "mlx": mlx_metal::mlx_version(),
            "engine": env!("CARGO_PKG_VERSION"),
        },
        "device": device.to_string(),
        "device_info": device_info,
        "model": {
            "dir": o.model.display().to_string(),
            "architecture": desc.architecture,
            "num_layers": desc.num_layers,
            "vocab_size": vocab,
            "quant_bits": desc.quant_bits,
            "quant_group": desc.quant_group,
        },
        "settings": settings_json(&o),
        "load_s": load_s,
        "ready_s": ready_s,
        "results": results,
    });
    doc["public"] = if o.public { public_side(&o, vocab, &doc)? } else { Value::Null };
    let text = serde_json::to_string_pretty(&doc)?;
    match &o.json {
        Some(p) => std::fs::write(p, text + "\n").map_err(|e| format!("could not write {}: {e}", p.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}
