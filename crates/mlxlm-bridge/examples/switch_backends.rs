// SPDX-License-Identifier: EUPL-1.2
//! Picks a backend by name at run time, loads a model with it and streams a greedy continuation.
//!
//! ```text
//! MLXR_PYTHON=~/.cache/mlxr/venv-<hash> \
//!     cargo run -p mlxlm-bridge --example switch_backends -- [--backend NAME] MODEL_DIR [PROMPT]
//! ```
//!
//! The backend comes from `--backend`, else the environment variable `MLXR_BACKEND`, else the
//! registry's default (the first available backend).

use std::io::Write;

use inference_core::{CancelToken, GenerateSettings, LoadSettings};

/// Registers every backend this example can switch between.
fn register_backends() {
    mlxlm_bridge::register();
    mlx_metal::register();
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    register_backends();
    let mut args = std::env::args().skip(1).collect::<Vec<_>>();
    let mut backend = std::env::var("MLXR_BACKEND").ok().filter(|b| !b.is_empty());
    if let Some(i) = args.iter().position(|a| a == "--backend") {
        if i + 1 >= args.len() {
            return Err("--backend needs a name".into());
        }
        backend = Some(args.remove(i + 1));
        args.remove(i);
    }
    let [model_dir, rest @ ..] = args.as_slice() else {
        return Err("usage: switch_backends [--backend NAME] MODEL_DIR [PROMPT]".into());
    };
    let prompt = rest.first().map_or("The capital of France is", String::as_str);

    for name in inference_core::list() {
        let b = inference_core::get(&name).ok_or("a registered backend disappeared")?;
        let state = if b.available() { "available".to_owned() } else { b.unavailable_reason().unwrap_or_default() };
        eprintln!("backend {name}: {state}");
    }
    let mut settings = LoadSettings::new();
    if let Some(name) = &backend {
        settings = settings.backend(name.as_str());
    }
    let model = inference_core::load_model(model_dir, &settings).map_err(|e| e.report())?;
    eprintln!("loaded {} ({})", model_dir, model.model_type());

    let mut stream =
        model.generate(prompt, &GenerateSettings::new().max_tokens(32), CancelToken::new()).map_err(|e| e.report())?;
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{prompt}");
    for token in &mut stream {
        let token = token.map_err(|e| e.report())?;
        let _ = write!(out, "{}", token.text);
        let _ = out.flush();
    }
    let _ = writeln!(out);
    if let Some(m) = stream.metrics() {
        eprintln!(
            "{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, peak memory {} bytes",
            m.prompt_tokens, m.prefill_tokens_per_sec, m.generated_tokens, m.decode_tokens_per_sec, m.peak_memory_bytes
        );
    }
    model.close().map_err(|e| e.report())
}
