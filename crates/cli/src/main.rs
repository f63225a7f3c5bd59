// SPDX-License-Identifier: EUPL-1.2
//! `mlxr` — run and fine-tune LLMs on MLX: one binary for people.
//!
//! Subcommands: `generate` (one prompt, streamed), `chat` (an interactive conversation),
//! `serve` (an OpenAI-compatible HTTP server), `models` (discover model directories), `info`
//! (model, device and MLX version), `bench` (the engine's speed on a model), `lora` (fine-tune a LoRA adapter),
//! `fuse` (fold an adapter into its model) and `convert` (a Hugging Face checkpoint to an MLX
//! model, as `mlx_lm.convert`). Backends are
//! chosen by name at run time (`--backend metal` or `mlx_lm`); each one this binary was built
//! with (cargo features `metal` and `mlx_lm`) is registered at start-up.

#![forbid(unsafe_code)]

mod adapter_arg;
mod args;
#[cfg(feature = "metal")]
mod bench;
mod chat;
#[cfg(feature = "metal")]
mod convert;
mod failure;
mod generate;
mod info;
mod models;
mod output;
mod serve;
mod tensor_parallel;
#[cfg(feature = "metal")]
mod train;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::failure::Failure;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Serve(_)));
    register_backends();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("mlxr: error: {}", failure.message());
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Generate(a) => generate::run(&a),
        Command::Chat(a) => chat::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Models(a) => models::run(&a),
        Command::Info(a) => info::run(&a),
        #[cfg(feature = "metal")]
        Command::Bench(a) => bench::run(&a),
        #[cfg(feature = "metal")]
        Command::Lora(a) => train::run_lora(&a),
        #[cfg(feature = "metal")]
        Command::Fuse(a) => train::run_fuse(&a),
        #[cfg(feature = "metal")]
        Command::Convert(a) => convert::run(&a),
        Command::Completions(a) => {
            use clap::CommandFactory;
            let mut out = std::io::stdout().lock();
            clap_complete::generate(a.shell, &mut Cli::command(), "mlxr", &mut out);
            std::io::Write::flush(&mut out).map_err(|e| failure::io("writing to standard output", e))
        }
    }
}

/// Every backend this binary was built with, in the process-wide registry.
fn register_backends() {
    #[cfg(feature = "metal")]
    mlx_metal::register();
    #[cfg(feature = "mlx_lm")]
    mlxlm_bridge::register();
}

/// Logs to stderr, filtered by `RUST_LOG`; the default is `warn`, and `info` for the server's
/// own request log. A span the filter lets through is logged when it closes, with its fields and
/// its busy and idle time (the engine's spans: docs/tracing.md). Colours only on a terminal, and
/// not with `NO_COLOR` set: a log written to a file or a pipe is plain text.
fn init_tracing(serving: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::format::FmtSpan;
    let default = if serving { "warn,mlxr=info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .try_init();
}
