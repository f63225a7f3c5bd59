// SPDX-License-Identifier: EUPL-1.2
//! `mlxr lora` (fine-tune a LoRA adapter with `mlx-train`) and `mlxr fuse` (fold one into its model).

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use inference_core::LoraDType;
use mlx_metal::lora::IfExists;
use mlx_train::{JsonLinesWriter, LoraChoices, ProgressPrinter, TrainConfig, TrainEvent};

use crate::failure::Failure;

/// `mlxr lora`: the trainer's options, mlx-lm's names where it has them.
#[derive(Debug, Clone, Args)]
pub(crate) struct LoraArgs {
    /// The model directory to adapt.
    #[arg(short, long, value_name = "DIR")]
    pub(crate) model: PathBuf,
    /// The dataset directory: train.jsonl and, optionally, valid.jsonl (mlx-lm's formats: "text",
    /// "prompt"/"completion", or "messages").
    #[arg(long, value_name = "DIR")]
    pub(crate) data: PathBuf,
    /// A JSON file with the whole training config (mlx-train's `TrainConfig`); flags given on the
    /// command line override it.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Where the adapter (adapters.safetensors, adapter_config.json), its checkpoints and the
    /// optimiser state go: a new or empty directory, unless --resume.
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter_path: Option<PathBuf>,
    /// Iterations (batches) to train.
    #[arg(long)]
    pub(crate) iters: Option<usize>,
    /// Records per batch.
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub(crate) learning_rate: Option<f32>,
    /// LoRA rank.
    #[arg(long)]
    pub(crate) rank: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long)]
    pub(crate) alpha: Option<f32>,
    /// Dropout on the adapters' input.
    #[arg(long)]
    pub(crate) dropout: Option<f32>,
    /// Projections to adapt, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',')]
    pub(crate) targets: Option<Vec<String>>,
    /// Adapt only the last N blocks.
    #[arg(long, value_name = "N")]
    pub(crate) num_layers: Option<usize>,
    /// Element type of the adapter weights: f32, or bf16 for mixed precision.
    #[arg(long, value_name = "f32|bf16")]
    pub(crate) lora_dtype: Option<String>,
    /// Warm-up updates (linear from 0 to the learning rate).
    #[arg(long)]
    pub(crate) warmup: Option<usize>,
    /// Decay the learning rate along a cosine to 0 over the updates after the warm-up.
    #[arg(long)]
    pub(crate) cosine_decay: bool,
    /// Clip gradients to this global norm.
    #[arg(long)]
    pub(crate) grad_clip: Option<f32>,
    /// Batches per update.
    #[arg(long)]
    pub(crate) grad_accumulation: Option<usize>,
    /// Recompute each block's activations in the backward pass (less memory, more time).
    #[arg(long)]
    pub(crate) grad_checkpoint: bool,
    /// Evaluate on valid.jsonl every N iterations (0: never).
    #[arg(long, value_name = "N")]
    pub(crate) steps_per_eval: Option<usize>,
    /// Validation batches per evaluation.
    #[arg(long)]
    pub(crate) val_batches: Option<usize>,
    /// Save the adapter every N iterations (0: only at the end).
    #[arg(long, value_name = "N")]
    pub(crate) save_every: Option<usize>,
    /// Longest sequence in tokens; longer records are an error naming their line.
    #[arg(long)]
    pub(crate) max_seq_length: Option<usize>,
    /// Leave prompt tokens out of the loss (prompt/completion and chat data).
    #[arg(long)]
    pub(crate) mask_prompt: bool,
    /// Seed of the initialisation, dropout and batch order.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Continue from the adapter and optimiser state in the adapter path. The adapter's rank,
    /// alpha, dropout, targets, layers and element type come from it; any of those flags given must
    /// agree with it.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Report every event as a JSON line on standard output instead of a progress display.
    #[arg(long)]
    pub(crate) json: bool,
}

impl LoraArgs {
    /// The training config: the file's (or the defaults), then the flags.
    pub(crate) fn config(&self) -> Result<TrainConfig, Failure> {
        let (mut c, mut chosen) = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Failure::new(format!("reading {}: {e}", path.display())))?;
                let c = serde_json::from_str::<TrainConfig>(&text)
                    .map_err(|e| Failure::new(format!("{}: not a training config: {e}", path.display())))?;
                (c, LoraChoices::in_json(&text))
            }
            None => (TrainConfig::default(), LoraChoices::default()),
        };
        chosen.rank |= self.rank.is_some();
        chosen.alpha |= self.alpha.is_some();
        chosen.dropout |= self.dropout.is_some();
        chosen.target_keys |= self.targets.is_some();
        chosen.num_layers |= self.num_layers.is_some();
        chosen.dtype |= self.lora_dtype.is_some();
        c.model = self.model.clone();
        c.data = self.data.clone();
        if let Some(v) = &self.adapter_path {
            c.adapter_path = v.clone();
        }
        set(&mut c.iters, self.iters);
        set(&mut c.batch_size, self.batch_size);
        set(&mut c.learning_rate, self.learning_rate);
        set(&mut c.lora.rank, self.rank);
        set(&mut c.lora.alpha, self.alpha);
        set(&mut c.lora.dropout, self.dropout);
        if let Some(t) = &self.targets {
            c.lora.target_keys = t.clone();
        }
        if self.num_layers.is_some() {
            c.lora.num_layers = self.num_layers;
        }
        if let Some(d) = &self.lora_dtype {
            c.lora.dtype = match d.as_str() {
                "f32" | "float32" => LoraDType::F32,
                "bf16" | "bfloat16" => LoraDType::Bf16,
                other => return Err(Failure::new(format!("--lora-dtype {other:?}: expected f32 or bf16"))),
            };
        }
        set(&mut c.schedule.warmup_steps, self.warmup);
        if self.cosine_decay {
            c.schedule.cosine_decay_steps = Some(c.iters.saturating_sub(c.schedule.warmup_steps).max(1));
        }
        if self.grad_clip.is_some() {
            c.grad_clip = self.grad_clip;
        }
        set(&mut c.grad_accumulation_steps, self.grad_accumulation);
        c.grad_checkpoint |= self.grad_checkpoint;
        set(&mut c.steps_per_eval, self.steps_per_eval);
        if self.val_batches.is_some() {
            c.val_batches = self.val_batches;
        }
        set(&mut c.save_every, self.save_every);
        set(&mut c.dataset.max_seq_length, self.max_seq_length);
        c.dataset.mask_prompt |= self.mask_prompt;
        set(&mut c.seed, self.seed);
        c.resume |= self.resume;
        c.adopt_saved_adapter(chosen).map_err(|e| Failure::new(e.to_string()))?;
        c.validate().map_err(|e| Failure::new(e.to_string()))?;
        Ok(c)
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// A progress bar on a terminal: one bar over the iterations, with the latest loss, speed and
/// learning rate; evaluations and saves are printed above it.
struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        Bar { bar }
    }

    fn event(&mut self, event: &TrainEvent) -> ControlFlow<()> {
        match event {
            TrainEvent::Start { iters, start, trainable_parameters, train_records, valid_records } => {
                self.bar.set_length(*iters as u64);
                self.bar.set_position(*start as u64);
                self.bar.println(format!(
                    "training {trainable_parameters} parameters on {train_records} records \
                     ({valid_records} for validation)"
                ));
            }
            TrainEvent::Train(r) => {
                self.bar.set_position(r.iteration as u64);
                self.bar.set_message(format!(
                    "loss {:.3}, {:.0} tok/s, lr {:.2e}, peak {:.2} GB",
                    r.loss,
                    r.tokens_per_second,
                    r.learning_rate,
                    r.peak_memory as f64 / 1e9
                ));
            }
            TrainEvent::Eval { iteration, val_loss, seconds } => {
                self.bar.println(format!("iteration {iteration}: validation loss {val_loss:.3} ({seconds:.1} s)"));
            }
            TrainEvent::Saved { iteration, checkpoint } => {
                self.bar.println(format!("iteration {iteration}: saved {}", checkpoint.display()));
            }
            TrainEvent::Resumed { iteration, weights, note } => {
                if let Some(note) = note {
                    self.bar.println(format!("note: {note}"));
                }
                self.bar.println(format!("resuming after iteration {iteration} from {}", weights.display()));
            }
        }
        ControlFlow::Continue(())
    }
}

/// `mlxr lora`.
pub(crate) fn run_lora(args: &LoraArgs) -> Result<(), Failure> {
    let config = args.config()?;
    let summary = if args.json {
        let mut w = JsonLinesWriter::new(std::io::stdout().lock());
        mlx_train::train(&config, |e| w.event(e))
    } else if std::io::stderr().is_terminal() {
        let mut bar = Bar::new();
        let r = mlx_train::train(&config, |e| bar.event(e));
        bar.bar.finish_and_clear();
        r
    } else {
        let mut p = ProgressPrinter::new(std::io::stderr().lock());
        mlx_train::train(&config, |e| p.event(e))
    }
    .map_err(|e| Failure::new(e.to_string()))?;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "{} iterations; last loss {}; adapter in {}",
        summary.iterations,
        summary.last_loss.map_or("-".to_owned(), |l| format!("{l:.3}")),
        summary.adapter_path.display()
    );
    Ok(())
}

/// `mlxr fuse`.
#[derive(Debug, Clone, Args)]
pub(crate) struct FuseArgs {
    /// The base model directory.
    #[arg(short, long, value_name = "DIR")]
    pub(crate) model: PathBuf,
    /// The adapter directory (adapters.safetensors and adapter_config.json, as mlx-lm writes them).
    #[arg(long, value_name = "DIR", default_value = "adapters")]
    pub(crate) adapter_path: PathBuf,
    /// Where to write the fused, standalone model (a quantised base is re-quantised): a new or
    /// empty directory, unless --force.
    #[arg(long, value_name = "DIR", default_value = "fused_model")]
    pub(crate) save_path: PathBuf,
    /// Replace the save path if it already holds anything: the directory and everything in it
    /// give way to the fused model (never the model or adapter directory).
    #[arg(long)]
    pub(crate) force: bool,
}

/// `mlxr fuse`.
pub(crate) fn run_fuse(args: &FuseArgs) -> Result<(), Failure> {
    let if_exists = if args.force { IfExists::Replace } else { IfExists::Refuse };
    let fused = {
        let _spinner = crate::args::spinner(format!("fusing into {}", args.save_path.display()));
        mlx_train::fuse(&args.model, &args.adapter_path, &args.save_path, if_exists)
    }
    .map_err(|e| Failure::new(e.to_string()))?;
    eprintln!("fused {} layers into {}", fused.len(), args.save_path.display());
    Ok(())
}
