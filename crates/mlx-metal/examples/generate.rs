// SPDX-License-Identifier: EUPL-1.2
//! Chat with a model through the "metal" backend, streaming the answer.
//!
//! ```sh
//! cargo run --release -p mlx-metal --example generate -- [--model DIR] [--max-tokens N] [PROMPT]
//! ```
//!
//! Without `--model` it uses SmolLM2 135M Instruct from the fixtures cache
//! (`cargo xtask fixtures` puts it in `~/.cache/mlxr/models`).

use std::io::Write;
use std::path::PathBuf;

use inference_core::{CancelToken, GenerateSettings, LoadSettings, Message};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {}", e.report());
        std::process::exit(1);
    }
}

fn run() -> inference_core::Result<()> {
    let mut model: Option<PathBuf> = None;
    let mut max_tokens = 64;
    let mut prompt = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model = args.next().map(PathBuf::from),
            "--max-tokens" => max_tokens = args.next().and_then(|n| n.parse().ok()).unwrap_or(max_tokens),
            _ => prompt.push(a),
        }
    }
    let prompt = if prompt.is_empty() { "What is the capital of France?".to_string() } else { prompt.join(" ") };
    let model = model.unwrap_or_else(|| {
        let base = std::env::var_os("MLXR_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/mlxr/models"));
        base.join("smollm2-135m-instruct")
    });

    mlx_metal::register();
    let llm = inference_core::load_model(&model, &LoadSettings::default().backend("metal"))?;
    let info = llm.info();
    eprintln!("{} ({} layers, vocab {}) from {}", info.architecture, info.num_layers, info.vocab_size, model.display());
    eprintln!("> {prompt}");
    let settings = GenerateSettings::default().max_tokens(max_tokens);
    let stream = llm.chat(&[Message::user(prompt)], &settings, CancelToken::new())?;
    let mut out = std::io::stdout();
    for token in stream {
        let token = token?;
        let _ = write!(out, "{}", token.text);
        let _ = out.flush();
    }
    println!();
    let m = llm.metrics();
    eprintln!(
        "prompt {} tokens at {:.1} tok/s, generated {} tokens at {:.1} tok/s, peak memory {:.0} MiB",
        m.prompt_tokens,
        m.prefill_tokens_per_sec,
        m.generated_tokens,
        m.decode_tokens_per_sec,
        m.peak_memory_bytes as f64 / (1024.0 * 1024.0)
    );
    llm.close()
}
