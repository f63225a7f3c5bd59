// SPDX-License-Identifier: EUPL-1.2
//! Tensor-parallel generation over MLX's distributed layer.
//!
//! ```text
//! cargo run --release -p mlx-metal --example tp_generate -- \
//!     --ranks 2 --backend ring --model ~/.cache/mlxr/models/smollm2-135m-instruct \
//!     --max-tokens 32 "What is the capital of France?"
//! ```
//!
//! Started by hand, it starts `--ranks` copies of itself on this machine
//! (ring: a loopback hostfile in `MLX_HOSTFILE` and `MLX_RANK` per rank;
//! nccl: `MLX_RANK`, `MLX_WORLD_SIZE`, `NCCL_HOST_IP`, `NCCL_PORT`, one GPU
//! per rank, `NCCL_NVLS_ENABLE=0`) and waits for them: a rank that fails ends
//! the job. Started by `mlx.launch` (or any launcher that sets `MLX_RANK`)
//! it is one rank. Every rank loads its shard of the model; rank 0 makes the
//! calls and prints the text, and the other ranks run the same jobs through
//! `MetalModel::follow` until rank 0's model is closed.
//!
//! `--tp-vocab replicated` keeps the embedding and head whole on every rank
//! (the default, `sharded`, splits them by vocabulary row); `--bench` times
//! one greedy generation after a warm-up, EOS ignored, with a prompt of
//! `--prompt-words N` words.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use inference_core::{CancelToken, GenerateSettings, LoadSettings, Message, TextModel};
use mlx::distributed::Backend;
use mlx::distributed::launch::{self, Role};
use mlx_metal::MetalModel;

struct Args {
    ranks: usize,
    backend: Backend,
    model: PathBuf,
    max_tokens: usize,
    timeout_s: Option<f64>,
    prompt: String,
    /// Generate exactly `max_tokens` (EOS ignored) from the raw prompt, and
    /// print the metrics as JSON on rank 0: for benchmarks.
    bench: bool,
    /// `tp_vocab`: `sharded` (default) or `replicated`.
    tp_vocab: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        ranks: 2,
        backend: Backend::Ring,
        model: PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/mlxr/models/smollm2-135m-instruct"),
        max_tokens: 32,
        timeout_s: None,
        prompt: String::new(),
        bench: false,
        tp_vocab: None,
    };
    let mut prompt = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--ranks" => a.ranks = value("--ranks")?.parse().map_err(|_| "--ranks takes a number")?,
            "--backend" => a.backend = value("--backend")?.parse().map_err(|e| format!("{e}"))?,
            "--model" => a.model = PathBuf::from(value("--model")?),
            "--max-tokens" => {
                a.max_tokens = value("--max-tokens")?.parse().map_err(|_| "--max-tokens takes a number")?
            }
            "--timeout-s" => {
                a.timeout_s = Some(value("--timeout-s")?.parse().map_err(|_| "--timeout-s takes seconds")?);
            }
            "--bench" => a.bench = true,
            "--tp-vocab" => a.tp_vocab = Some(value("--tp-vocab")?),
            "--prompt-words" => {
                // The bench models' word-level vocabulary: "t0 t1 ...".
                let n: usize = value("--prompt-words")?.parse().map_err(|_| "--prompt-words takes a number")?;
                prompt.push((0..n).map(|i| format!("t{}", (i * 7919) % 4096)).collect::<Vec<_>>().join(" "));
            }
            _ => prompt.push(arg),
        }
    }
    if a.ranks < 1 {
        return Err("--ranks must be at least 1".into());
    }
    a.prompt = if prompt.is_empty() { "What is the capital of France?".into() } else { prompt.join(" ") };
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let timeout = args.timeout_s.filter(|t| t.is_finite() && *t > 0.0).map(Duration::from_secs_f64);
    match launch::launch_or_join(args.ranks, args.backend, timeout) {
        Ok(Role::Launched(outputs)) => eprintln!("{} ranks finished", outputs.len()),
        Ok(Role::Rank(rank)) => {
            if let Err(e) = run_rank(rank, &args) {
                eprintln!("rank {rank}: error: {}", e.report());
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn run_rank(rank: i32, args: &Args) -> inference_core::Result<()> {
    let mut settings = LoadSettings::default()
        .backend_option("tensor_parallel", args.ranks.to_string())
        .backend_option("distributed_backend", args.backend.name());
    if let Some(layout) = &args.tp_vocab {
        settings = settings.backend_option("tp_vocab", layout.as_str());
    }
    let llm = MetalModel::load(&args.model, &settings)?;
    if rank != 0 {
        // Rank 0's calls, mirrored, until it closes its model.
        llm.follow()?;
        return llm.close();
    }
    let generate = GenerateSettings::default().max_tokens(args.max_tokens).temperature(0.0).ignore_eos(args.bench);
    if args.bench {
        // A warm-up run, then the measured one.
        llm.generate(&args.prompt, &generate, CancelToken::new())?.complete()?;
        let out = llm.generate(&args.prompt, &generate, CancelToken::new())?.complete()?;
        let m = out.metrics.unwrap_or_default();
        println!(
            "{{\"ranks\": {}, \"prompt_tokens\": {}, \"generated_tokens\": {}, \"prefill_tok_s\": {:.1}, \
             \"decode_tok_s\": {:.1}, \"peak_memory_bytes\": {}}}",
            args.ranks,
            m.prompt_tokens,
            m.generated_tokens,
            m.prefill_tokens_per_sec,
            m.decode_tokens_per_sec,
            m.peak_memory_bytes
        );
        return llm.close();
    }
    let stream = llm.chat(&[Message::user(args.prompt.clone())], &generate, CancelToken::new())?;
    let mut out = std::io::stdout();
    for token in stream {
        let token = token?;
        let _ = write!(out, "{}", token.text);
        let _ = out.flush();
    }
    println!();
    llm.close()
}
