// SPDX-License-Identifier: EUPL-1.2
//! What one batched decode step costs, per number of rows: the engine's batch loop
//! ([`mlx_metal::batch::generate`], which the server's scheduler steps the same way) on a model
//! directory, greedy, every row fed the same kind of pseudo-random prompt as `bench`.
//!
//! ```sh
//! cargo run --release -p mlx-metal --example batch_step -- --model DIR \
//!     [--rows 1,2,4,8,16,32] [--prompt 128] [--ragged 0] [--decode 64] [--runs 2] [--census]
//! ```
//!
//! Row `i`'s prompt has `prompt - (i * ragged) % prompt` tokens, so `--ragged 0` gives a batch
//! without padding (no attention mask in a decode step) and anything else a left-padded one
//! (a mask per step, as a server's batch has). A step's time is the median gap between row 0's
//! tokens after the first; the report is one line per row count, the best of `--runs`. At one
//! row the single-sequence loop ([`mlx_metal::generate::generate`]) is timed too, for what the
//! batch's machinery costs, and the host's share of a step: the median time a greedy loop of
//! the model's own takes to build one step (`forward`, `argmax`) and to queue it (`async_eval`,
//! where MLX encodes the kernels), which the device's work hides only while it is the shorter.
//! `--census` also prints that step's graph ([`mlx::transforms::graph_census`]): its nodes by
//! primitive, those that compute (about a kernel each on a GPU) and those that only change a
//! layout.
//! `xtask/bench/batch_step.py` measures mlx-lm's `BatchGenerator` the same way.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use mlx::transforms::{GraphCensus, async_eval, graph_census};
use mlx::{Array, ops};
use mlx_metal::bench::prompt_ids;
use mlx_metal::generate::{self, LoopOptions};
use mlx_metal::model::{self, LanguageModel};
use mlx_metal::sample::{Sampler, SamplerConfig};

type BoxError = Box<dyn std::error::Error>;

const USAGE: &str = "usage: batch_step --model DIR [--rows 1,2,4,8,16,32] [--prompt 128] [--ragged 0] [--decode 64] [--runs 2] \
     [--census]";

struct Options {
    model: PathBuf,
    rows: Vec<usize>,
    prompt: usize,
    ragged: usize,
    decode: usize,
    runs: usize,
    census: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        model: PathBuf::new(),
        rows: vec![1, 2, 4, 8, 16, 32],
        prompt: 128,
        ragged: 0,
        decode: 64,
        runs: 2,
        census: false,
    };
    let mut model = None;
    let mut args = std::env::args().skip(1);
    let num = |name: &str, v: &str| v.trim().parse::<usize>().map_err(|_| format!("{name}: {v:?} is not a number"));
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value("--model")?)),
            "--rows" => {
                o.rows = value("--rows")?.split(',').map(|s| num("--rows", s)).collect::<Result<_, _>>()?;
            }
            "--prompt" => o.prompt = num("--prompt", &value("--prompt")?)?,
            "--ragged" => o.ragged = num("--ragged", &value("--ragged")?)?,
            "--decode" => o.decode = num("--decode", &value("--decode")?)?,
            "--runs" => o.runs = num("--runs", &value("--runs")?)?,
            "--census" => o.census = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    o.model = model.ok_or_else(|| format!("--model is required\n{USAGE}"))?;
    if o.rows.is_empty() || o.rows.contains(&0) || o.prompt == 0 || o.runs == 0 || o.decode < 3 {
        return Err(format!("rows, prompt and runs must be at least 1 and decode at least 3\n{USAGE}"));
    }
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The best of `runs` medians of the gaps between the times `one_run` records after its first
/// (a step each), after one uncounted run (which compiles the kernels of this shape).
fn best_step_ms(
    runs: usize,
    mut one_run: impl FnMut(&mut Vec<Instant>) -> Result<(), BoxError>,
) -> Result<f64, BoxError> {
    let mut best = f64::INFINITY;
    for run in 0..=runs {
        let mut times = Vec::new();
        one_run(&mut times)?;
        let gaps: Vec<f64> = times.windows(2).skip(1).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect();
        if run > 0 && !gaps.is_empty() {
            best = best.min(median(gaps));
        }
    }
    Ok(best)
}

fn run() -> Result<(), BoxError> {
    let o = parse_args()?;
    let loaded = model::load(&o.model)?;
    let lm = loaded.model.as_ref();
    let vocab = lm.description().vocab_size;
    let sampler = Sampler::new(SamplerConfig::default())?;
    println!("| rows | step ms | tok/s | ms per row | single-sequence loop ms | host ms a step (build + queue) |");
    println!("|---|---|---|---|---|---|");
    let mut census = None;
    for &rows in &o.rows {
        let prompts: Vec<Vec<u32>> =
            (0..rows).map(|i| prompt_ids(o.prompt - (i * o.ragged) % o.prompt, vocab, i as u64)).collect();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let limits = vec![o.decode; rows];
        let best = best_step_ms(o.runs, |times| {
            mlx_metal::batch::generate(lm, &refs, &sampler, &limits, 2048, &|| false, |row, _| {
                if row == 0 {
                    times.push(Instant::now());
                }
                Ok(ControlFlow::Continue(()))
            })?;
            Ok(())
        })?;
        // The single-sequence loop on the same prompt, fresh caches each run.
        let (single, host) = if rows == 1 {
            let opts = LoopOptions { max_tokens: o.decode, prefill_step: 2048 };
            let ms = best_step_ms(o.runs, |times| {
                let mut caches = lm.make_cache()?;
                generate::generate(lm, &mut caches, &prompts[0], &sampler, &opts, &|| false, |_| {
                    times.push(Instant::now());
                    Ok(ControlFlow::Continue(()))
                })?;
                Ok(())
            })?;
            let host = (0..=o.runs)
                .map(|run| host_ms(lm, &prompts[0], o.decode, o.census && run == 0))
                .collect::<Result<Vec<_>, _>>()?;
            census = host.first().and_then(|h| h.2.clone());
            let best = host[1..]
                .iter()
                .map(|h| (h.0, h.1))
                .min_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)))
                .unwrap_or_default();
            (format!("{ms:.2}"), format!("{:.2} + {:.2}", best.0, best.1))
        } else {
            ("-".into(), "-".into())
        };
        let per_s = rows as f64 * 1e3 / best;
        println!("| {rows} | {best:.2} | {per_s:.1} | {:.2} | {single} | {host} |", best / rows as f64);
    }
    if let Some(c) = census {
        println!(
            "\none row's decode step (forward, argmax): {} nodes, {} computing, {} layout only",
            c.nodes(),
            c.computing(),
            c.layout_only()
        );
        println!("{}", c.by_count().iter().map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", "));
    }
    Ok(())
}

/// The median host time of building one greedy decode step (the forward pass and `argmax`) and
/// of queueing it (`async_eval`), in a loop that then waits for the step before; and, when asked,
/// the first step's graph, counted between the two timings so that neither includes it.
fn host_ms(
    lm: &dyn LanguageModel,
    prompt: &[u32],
    decode: usize,
    count: bool,
) -> Result<(f64, f64, Option<GraphCensus>), BoxError> {
    let mut caches = lm.make_cache()?;
    let last = |logits: &Array| -> Result<Array, BoxError> {
        let t = logits.shape()[1];
        Ok(ops::argmax(&ops::squeeze(&ops::slice_axis(logits, 1, t - 1, t)?, &[1])?, -1, false)?)
    };
    let x = Array::from_slice(prompt, &[1, prompt.len() as i32])?;
    let mut y = last(&lm.forward(&x, &mut caches)?)?;
    async_eval(&[&y])?;
    let (mut build, mut queue) = (Vec::with_capacity(decode), Vec::with_capacity(decode));
    let mut census = None;
    for step in 0..decode {
        let t0 = Instant::now();
        let next = last(&lm.forward(&ops::reshape(&y, &[1, 1])?, &mut caches)?)?;
        build.push(t0.elapsed().as_secs_f64() * 1e3);
        if count && step == 0 {
            census = Some(graph_census(&[&next])?);
        }
        let t1 = Instant::now();
        async_eval(&[&next])?;
        queue.push(t1.elapsed().as_secs_f64() * 1e3);
        y.eval()?;
        y = next;
    }
    y.eval()?;
    Ok((median(build), median(queue), census))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("batch_step: {e}");
        std::process::exit(1);
    }
}
