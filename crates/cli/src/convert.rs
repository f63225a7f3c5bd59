// SPDX-License-Identifier: EUPL-1.2
//! `mlxr convert`: a Hugging Face checkpoint to an MLX model, as `mlx_lm.convert` writes it
//! (`mlx_metal::convert`), with a progress bar over the tensors on a terminal and plain lines
//! otherwise.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mlx_metal::Dtype;
use mlx_metal::convert::{self, ConvertOptions, Event, Recipe, Summary};
use mlx_metal::lora::IfExists;

use crate::failure::Failure;

/// `mlxr convert` (mlx-lm's flag names).
#[derive(Debug, Clone, Args)]
pub(crate) struct ConvertArgs {
    /// The Hugging Face model directory to convert (config.json, *.safetensors, tokenizer files;
    /// float32, float16 or bfloat16 weights).
    #[arg(short = 'm', long = "hf-path", visible_alias = "model", value_name = "DIR")]
    pub(crate) hf_path: PathBuf,
    /// Where to write the MLX model: a new or empty directory, unless --force.
    #[arg(long, value_name = "DIR", default_value = "mlx_model")]
    pub(crate) mlx_path: PathBuf,
    /// Quantise the linear layers and the embedding (affine; 4 bits in groups of 64 unless told).
    #[arg(short = 'q', long)]
    pub(crate) quantize: bool,
    /// Bits per weight when quantising: 2, 3, 4, 6 or 8 (default 4).
    #[arg(long, value_name = "BITS", value_parser = parse_bits)]
    pub(crate) q_bits: Option<i32>,
    /// Group size when quantising: 32, 64 or 128 (default 64).
    #[arg(long, value_name = "SIZE", value_parser = parse_group_size)]
    pub(crate) q_group_size: Option<i32>,
    /// The type of the unquantised weights: float16, bfloat16 or float32 (default: config.json's
    /// torch_dtype, else the checkpoint's own).
    #[arg(long, value_name = "TYPE", value_parser = parse_dtype)]
    pub(crate) dtype: Option<Dtype>,
    /// A mixed-bit recipe when quantising: mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6 (more bits
    /// for the output head and some v_proj and down_proj layers).
    #[arg(long, value_name = "RECIPE", value_parser = parse_recipe)]
    pub(crate) quant_predicate: Option<Recipe>,
    /// Replace the MLX path if it already holds anything: the directory and everything in it give
    /// way to the converted model (never the model being converted).
    #[arg(long)]
    pub(crate) force: bool,
}

fn parse_bits(s: &str) -> Result<i32, String> {
    s.parse().ok().filter(|b| convert::BITS.contains(b)).ok_or_else(|| "choose 2, 3, 4, 6 or 8 bits".to_owned())
}

fn parse_group_size(s: &str) -> Result<i32, String> {
    s.parse().ok().filter(|g| convert::GROUP_SIZES.contains(g)).ok_or_else(|| "choose 32, 64 or 128".to_owned())
}

fn parse_dtype(s: &str) -> Result<Dtype, String> {
    match s {
        "float16" => Ok(Dtype::Float16),
        "bfloat16" => Ok(Dtype::Bfloat16),
        "float32" => Ok(Dtype::Float32),
        _ => Err("choose float16, bfloat16 or float32".to_owned()),
    }
}

fn parse_recipe(s: &str) -> Result<Recipe, String> {
    Recipe::parse(s).ok_or_else(|| "choose mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6".to_owned())
}

impl ConvertArgs {
    fn options(&self) -> ConvertOptions {
        ConvertOptions {
            quantize: self.quantize,
            q_bits: self.q_bits,
            q_group_size: self.q_group_size,
            dtype: self.dtype,
            quant_predicate: self.quant_predicate,
            if_exists: if self.force { IfExists::Replace } else { IfExists::Refuse },
            ..ConvertOptions::default()
        }
    }

    /// The quantisation flags given without -q, which (as in mlx-lm) do nothing.
    fn idle_flags(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if !self.quantize {
            for (given, flag) in [
                (self.q_bits.is_some(), "--q-bits"),
                (self.q_group_size.is_some(), "--q-group-size"),
                (self.quant_predicate.is_some(), "--quant-predicate"),
            ] {
                if given {
                    flags.push(flag);
                }
            }
        }
        flags
    }
}

/// What is printed as the conversion goes: a bar on a terminal, lines otherwise.
enum Report {
    Bar(ProgressBar),
    Lines,
}

impl Report {
    fn event(&mut self, event: Event<'_>) {
        match (self, event) {
            (report, Event::Start { architecture, dtype, quantised_layers, tensors, bytes, shards }) => {
                let dtype = dtype.map_or("the checkpoint's own types".to_owned(), |d| d.name().to_owned());
                let quantised =
                    if quantised_layers > 0 { format!(", {quantised_layers} layers quantised") } else { String::new() };
                let line = format!(
                    "converting a {architecture} model: {tensors} tensors, {} in {shards} shard{}, floats as \
                     {dtype}{quantised}",
                    megabytes(bytes),
                    if shards == 1 { "" } else { "s" }
                );
                match report {
                    Report::Bar(bar) => {
                        bar.set_length(tensors as u64);
                        bar.println(line);
                    }
                    Report::Lines => eprintln!("{line}"),
                }
            }
            (Report::Bar(bar), Event::Tensor { done, name }) => {
                bar.set_position(done as u64);
                bar.set_message(name.to_owned());
            }
            (Report::Lines, Event::Tensor { .. }) => {}
            (report, Event::Shard { file, tensors, bytes }) => {
                let line = format!("wrote {file} ({tensors} tensors, {})", megabytes(bytes));
                match report {
                    Report::Bar(bar) => bar.println(line),
                    Report::Lines => eprintln!("{line}"),
                }
            }
        }
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// `mlxr convert`.
pub(crate) fn run(args: &ConvertArgs) -> Result<(), Failure> {
    let idle = args.idle_flags();
    if !idle.is_empty() {
        eprintln!("note: {} only take effect with -q/--quantize (as in mlx_lm.convert)", idle.join(", "));
    }
    let start = Instant::now();
    let mut report = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} tensors [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        Report::Bar(bar)
    } else {
        Report::Lines
    };
    let result = convert::convert(&args.hf_path, &args.mlx_path, &args.options(), &mut |e| report.event(e));
    if let Report::Bar(bar) = &report {
        bar.finish_and_clear();
    }
    let summary: Summary = result.map_err(|e| Failure::new(e.to_string()))?;
    let quantised = if summary.quantised_layers > 0 {
        format!(", {:.3} bits per weight", summary.bits_per_weight())
    } else {
        String::new()
    };
    eprintln!(
        "converted {} to {} in {:.1} s: {} tensors, {}{quantised}",
        args.hf_path.display(),
        summary.out.display(),
        start.elapsed().as_secs_f64(),
        summary.tensors,
        megabytes(summary.bytes)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_outside_mlx_lm_s_choices_are_refused_by_name() {
        assert_eq!(parse_bits("4"), Ok(4));
        assert!(parse_bits("5").is_err() && parse_bits("x").is_err());
        assert_eq!(parse_group_size("128"), Ok(128));
        assert!(parse_group_size("16").is_err());
        assert_eq!(parse_dtype("bfloat16"), Ok(Dtype::Bfloat16));
        assert!(parse_dtype("float64").is_err());
        assert_eq!(parse_recipe("mixed_3_6"), Ok(Recipe::Mixed3_6));
        assert!(parse_recipe("mixed").is_err());
    }
}
