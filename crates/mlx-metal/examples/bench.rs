// SPDX-License-Identifier: EUPL-1.2
//! Our side of the benchmark: the engine's generation loop on a model directory.
//!
//! ```sh
//! cargo run --release -p mlx-metal --example bench -- --model DIR \
//!     [--prompts 128,512,2048] [--decode 256] [--runs 3] [--warmup 1] [--seed 0] \
//!     [--prefill-step 2048] [--dtype auto|float32|bfloat16|float16] [--no-public] [--json OUT]
//! ```
//!
//! The measuring lives in [`mlx_metal::bench`] (shared with `mlxr bench`). It measures the engine itself: `model::load`, `make_cache` and `generate::generate` with a
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

use std::path::PathBuf;

use mlx_metal::bench::{self, BenchOptions};

type BoxError = Box<dyn std::error::Error>;

#[derive(Debug)]
struct Options {
    bench: BenchOptions,
    json: Option<PathBuf>,
}

const USAGE: &str = "usage: bench --model DIR [--prompts 128,512,2048] [--decode 256] [--runs 3] [--warmup 1] \
                     [--seed 0] [--prefill-step 2048] [--dtype auto] [--no-public] [--json OUT]";

fn parse_args() -> Result<Options, String> {
    let mut o = Options { bench: BenchOptions::default(), json: None };
    let mut model = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        let num = |name: &str, v: String| v.parse::<usize>().map_err(|_| format!("{name}: {v:?} is not a number"));
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value("--model")?)),
            "--prompts" => {
                let v = value("--prompts")?;
                o.bench.prompts = v
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| num("--prompts", s.trim().into()))
                    .collect::<Result<_, _>>()?;
            }
            "--decode" => o.bench.decode = num("--decode", value("--decode")?)?,
            "--runs" => o.bench.runs = num("--runs", value("--runs")?)?,
            "--warmup" => o.bench.warmup = num("--warmup", value("--warmup")?)?,
            "--seed" => o.bench.seed = num("--seed", value("--seed")?)? as u64,
            "--prefill-step" => o.bench.prefill_step = num("--prefill-step", value("--prefill-step")?)?,
            "--json" => o.json = Some(PathBuf::from(value("--json")?)),
            "--dtype" => o.bench.dtype = value("--dtype")?.parse().map_err(|e: inference_core::Error| e.to_string())?,
            "--no-public" => o.bench.public = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    o.bench.model = model.ok_or_else(|| format!("--model is required\n{USAGE}"))?;
    o.bench.validate()?;
    Ok(o)
}

fn run() -> Result<(), BoxError> {
    let o = parse_args()?;
    let doc =
        bench::run(&o.bench, &mut |line| eprintln!("{line}")).map_err(|e| -> BoxError { e.to_string().into() })?;
    let text = serde_json::to_string_pretty(&doc)?;
    match &o.json {
        Some(p) => mlx::io::write_durable_bytes(p, (text + "\n").as_bytes())
            .map_err(|e| format!("could not write {}: {e}", p.display()))?,
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
