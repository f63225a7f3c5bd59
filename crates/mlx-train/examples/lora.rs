// SPDX-License-Identifier: EUPL-1.2
//! Trains a LoRA adapter from a JSON `TrainConfig`, printing progress for
//! people on stderr (or JSON Lines on stdout with `--json`), or fuses one.
//!
//! ```text
//! cargo run -p mlx-train --example lora -- train config.json [--json]
//! cargo run -p mlx-train --example lora -- fuse MODEL_DIR ADAPTER_DIR OUT_DIR
//! ```

use std::process::ExitCode;

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    match args {
        [cmd, config, rest @ ..] if cmd == "train" => {
            let text = std::fs::read_to_string(config)?;
            let mut config: mlx_train::TrainConfig = serde_json::from_str(&text)?;
            // Resuming: the adapter settings the file leaves out come from the saved adapter.
            config.adopt_saved_adapter(mlx_train::LoraChoices::in_json(&text))?;
            let summary = if rest.iter().any(|a| a == "--json") {
                let mut w = mlx_train::JsonLinesWriter::new(std::io::stdout());
                mlx_train::train(&config, |e| w.event(e))?
            } else {
                let mut p = mlx_train::ProgressPrinter::new(std::io::stderr());
                mlx_train::train(&config, |e| p.event(e))?
            };
            eprintln!("adapter in {}", summary.adapter_path.display());
            Ok(())
        }
        [cmd, model, adapter, out] if cmd == "fuse" => {
            let fused =
                mlx_train::fuse(model.as_ref(), adapter.as_ref(), out.as_ref(), mlx_metal::lora::IfExists::Refuse)?;
            eprintln!("fused {} layers into {out}", fused.len());
            Ok(())
        }
        _ => Err("usage: lora train CONFIG.json [--json] | lora fuse MODEL ADAPTER OUT".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
