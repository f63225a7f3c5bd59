// SPDX-License-Identifier: EUPL-1.2
//! LoRA fine-tuning on MLX, compatible with mlx-lm: its dataset formats, its
//! adapter files, its loss and its optimiser.
//!
//! - [`train`] runs a whole training from a [`TrainConfig`] (what a command
//!   line reads from flags or a file) and reports [`TrainEvent`]s to a
//!   callback; [`ProgressPrinter`] and [`JsonLinesWriter`] turn them into a
//!   progress display for people or JSON Lines for programs.
//! - [`fuse`] folds an adapter into its base model and writes a standalone
//!   model directory.
//! - [`Trainer`] is the step-by-step API underneath: value-and-grad over the
//!   adapter weights, [`AdamW`] with a [`LrSchedule`], clipping, accumulation
//!   and per-block gradient checkpointing.
//! - [`data`] reads JSON Lines (`text`, `prompt`/`completion`, `messages`),
//!   tokenises with the model's tokeniser and chat template, and batches as
//!   mlx-lm does; [`loss`] is mlx-lm's masked cross-entropy.
//!
//! The LoRA layer and adapter files live in [`mlx_metal::lora`], so inference
//! can load adapters without this crate.
//!
//! Train an adapter on a tiny fixture model, load it with the load settings,
//! and fold it into a standalone model:
//!
//! ```
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings};
//! # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models/llama-tiny");
//! let work = std::env::temp_dir().join(format!("mlxr-doc-lora-{}", std::process::id()));
//! let data = work.join("data");
//! std::fs::create_dir_all(&data)?;
//! // mlx-lm's formats, one record per line: {"text"}, {"prompt", "completion"} or {"messages"}.
//! std::fs::write(data.join("train.jsonl"), "{\"prompt\": \"Hi\", \"completion\": \" there\"}\n".repeat(4))?;
//! let config = mlx_train::TrainConfig {
//!     model: model.into(),
//!     data: data.clone(),
//!     adapter_path: work.join("adapters"),
//!     iters: 4,
//!     batch_size: 2,
//!     learning_rate: 1e-3,
//!     ..Default::default()
//! };
//! let mut printer = mlx_train::ProgressPrinter::new(std::io::stderr());
//! let summary = mlx_train::train(&config, |e| printer.event(e))?;
//! assert_eq!(summary.iterations, 4);
//!
//! // Load the adapter (adapters.safetensors + adapter_config.json, as mlx-lm writes them) at load time...
//! mlx_metal::register();
//! let settings = LoadSettings::new().backend("metal").adapter_path(&config.adapter_path);
//! let llm = inference_core::load_model(model, &settings)?;
//! let reply = llm.generate("Hi", &GenerateSettings::default().max_tokens(4), CancelToken::new())?.collect_text()?;
//! println!("{reply}");
//! // ...or fold it into the weights of a standalone model directory.
//! let out = work.join("fused");
//! let fused = mlx_train::fuse(model.as_ref(), &config.adapter_path, &out, mlx_metal::lora::IfExists::Refuse)?;
//! assert!(!fused.is_empty());
//! # std::fs::remove_dir_all(&work).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod data;
pub mod error;
pub mod loss;
pub mod optim;
pub mod resume;
pub mod trainer;

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use inference_core::{LoraConfig, LoraDType};
use mlx::{Dtype, memory, random};
use mlx_metal::chat::ChatTemplate;
use mlx_metal::lora::{self, AdapterConfig, LoraParameters};
use mlx_metal::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

pub use data::{Batch, BatchStream, DataConfig, Dataset, Encoder, Example, Format};
pub use error::{Error, TrainResult};
pub use optim::{AdamW, AdamWConfig, LrSchedule, clip_grad_norm};
pub use resume::{ITERATION_KEY, LoraChoices, Resumable};
pub use trainer::{STATE_FILE, StepOutput, StepSettings, Trainer};

/// Everything a training run needs; serde-able so a command line can read it
/// from a file, with mlx-lm's defaults where mlx-lm has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The model directory.
    pub model: PathBuf,
    /// The data directory: `train.jsonl` and, optionally, `valid.jsonl`.
    pub data: PathBuf,
    /// Where the adapter, its numbered checkpoints and the optimiser state are saved.
    pub adapter_path: PathBuf,
    /// Rank, alpha (the scale is alpha / rank), targets, dropout, dtype and
    /// how many blocks from the top are adapted (all when unset).
    pub lora: LoraConfig,
    /// Iterations (micro-batches) to train for. Default 1000.
    pub iters: usize,
    /// Records per batch. Default 4.
    pub batch_size: usize,
    /// The peak learning rate. Default 1e-5.
    pub learning_rate: f32,
    /// Warm-up and cosine decay.
    pub schedule: LrSchedule,
    /// AdamW's hyper-parameters.
    pub optimizer: AdamWConfig,
    /// Clip gradients to this global norm.
    pub grad_clip: Option<f32>,
    /// Micro-batches per update. Default 1.
    pub grad_accumulation_steps: usize,
    /// Recompute each block's activations in the backward pass. Default false.
    pub grad_checkpoint: bool,
    /// Report the training loss every this many iterations. Default 1 (every step).
    pub steps_per_report: usize,
    /// Evaluate on `valid.jsonl` every this many iterations (and at the first
    /// and last); 0 never. Default 200.
    pub steps_per_eval: usize,
    /// Validation batches per evaluation; `None` for all. Default 25.
    pub val_batches: Option<usize>,
    /// Save the adapter (and a numbered copy, and the optimiser state) every
    /// this many iterations; 0 only at the end. Default 100.
    pub save_every: usize,
    /// Dataset format options, including `max_seq_length` and `mask_prompt`.
    pub dataset: DataConfig,
    /// Seeds the adapter's initialisation, dropout and the batch order. Default 0.
    pub seed: u64,
    /// Continue from the adapter and optimiser state in `adapter_path`
    /// (whose adapter settings must be this config's:
    /// [`TrainConfig::adopt_saved_adapter`] takes them over). Without it,
    /// `adapter_path` must be missing or empty.
    pub resume: bool,
    /// Clear MLX's buffer cache after a step when it holds more than this
    /// many bytes. Default 0 (every step, as mlx-lm's default does).
    pub clear_cache_threshold: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: PathBuf::new(),
            data: PathBuf::from("data"),
            adapter_path: PathBuf::from("adapters"),
            lora: LoraConfig::default(),
            iters: 1000,
            batch_size: 4,
            learning_rate: 1e-5,
            schedule: LrSchedule::default(),
            optimizer: AdamWConfig::default(),
            grad_clip: None,
            grad_accumulation_steps: 1,
            grad_checkpoint: false,
            steps_per_report: 1,
            steps_per_eval: 200,
            val_batches: Some(25),
            save_every: 100,
            dataset: DataConfig::default(),
            seed: 0,
            resume: false,
            clear_cache_threshold: 0,
        }
    }
}

impl TrainConfig {
    /// The step settings this config describes.
    pub fn step_settings(&self) -> StepSettings {
        StepSettings {
            learning_rate: self.learning_rate,
            schedule: self.schedule,
            optimizer: self.optimizer,
            grad_clip: self.grad_clip,
            grad_accumulation_steps: self.grad_accumulation_steps,
            grad_checkpoint: self.grad_checkpoint,
            clear_cache_threshold: self.clear_cache_threshold,
        }
    }

    /// Checks every field that can be checked without the files.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first bad field.
    pub fn validate(&self) -> TrainResult<()> {
        self.lora.validate()?;
        if self.iters == 0 {
            return Err(Error::config("iters", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if self.steps_per_report == 0 {
            return Err(Error::config("steps_per_report", "must be at least 1"));
        }
        if self.val_batches == Some(0) {
            return Err(Error::config("val_batches", "must be at least 1 (leave it unset for all)"));
        }
        if self.model.as_os_str().is_empty() {
            return Err(Error::config("model", "must name a model directory"));
        }
        self.step_settings().validate()
    }
}

/// The adapter config (mlx-lm's `adapter_config.json`) for a LoRA config on a
/// model of `num_layers` blocks.
pub fn adapter_config(lora_cfg: &LoraConfig, num_layers: usize) -> AdapterConfig {
    let n = lora_cfg.num_layers.unwrap_or(num_layers).min(num_layers);
    AdapterConfig::new(
        i64::try_from(n).unwrap_or(i64::MAX),
        LoraParameters {
            rank: i32::try_from(lora_cfg.rank).unwrap_or(i32::MAX),
            scale: lora_cfg.scale(),
            dropout: lora_cfg.dropout,
            keys: Some(lora_cfg.target_keys.clone()),
        },
    )
}

/// The MLX dtype of LoRA weights.
pub fn lora_dtype(d: LoraDType) -> Dtype {
    match d {
        LoraDType::F32 => Dtype::Float32,
        LoraDType::Bf16 => Dtype::Bfloat16,
    }
}

/// A training-loss report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The iteration (1-based).
    pub iteration: usize,
    /// The mean loss over the iterations since the last report.
    pub loss: f32,
    /// The learning rate of the last update.
    pub learning_rate: f32,
    /// Target tokens per second over the iterations since the last report.
    pub tokens_per_second: f64,
    /// Iterations per second since the last report.
    pub iterations_per_second: f64,
    /// Target tokens trained on so far.
    pub trained_tokens: usize,
    /// MLX's peak memory so far, in bytes.
    pub peak_memory: usize,
    /// MLX's active memory now, in bytes.
    pub active_memory: usize,
}

/// What a training run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Training started.
    Start {
        /// The iterations to run.
        iters: usize,
        /// The iteration it starts after (non-zero when resuming).
        start: usize,
        /// Trainable parameters.
        trainable_parameters: usize,
        /// Training records.
        train_records: usize,
        /// Validation records.
        valid_records: usize,
    },
    /// A resumed run found the pair of adapter weights and optimiser state
    /// it continues from (reported before [`TrainEvent::Start`]).
    Resumed {
        /// The iteration both were saved at.
        iteration: usize,
        /// The weights file: `adapters.safetensors`, or the numbered
        /// checkpoint of that iteration when the last save was cut short.
        weights: PathBuf,
        /// Why the weights are not `adapters.safetensors`, when they are not.
        note: Option<String>,
    },
    /// A training-loss report.
    Train(StepReport),
    /// A validation loss.
    Eval {
        /// The iteration it was measured before (mlx-lm reports `iteration - 1`; this is the
        /// number of iterations trained so far).
        iteration: usize,
        /// The loss.
        val_loss: f32,
        /// Seconds it took.
        seconds: f64,
    },
    /// The adapter was saved.
    Saved {
        /// The iteration.
        iteration: usize,
        /// The numbered checkpoint written beside the adapter.
        checkpoint: PathBuf,
    },
}

/// What a finished run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Iterations done (including those of a resumed run).
    pub iterations: usize,
    /// The last reported training loss.
    pub last_loss: Option<f32>,
    /// The last validation loss.
    pub last_val_loss: Option<f32>,
    /// Where the adapter is.
    pub adapter_path: PathBuf,
    /// Whether the callback stopped the run early.
    pub stopped: bool,
}

/// Writes a human progress line per event.
pub struct ProgressPrinter<W: Write> {
    out: W,
    iters: usize,
}

impl<W: Write> ProgressPrinter<W> {
    /// A printer writing to `out`.
    pub fn new(out: W) -> Self {
        ProgressPrinter { out, iters: 0 }
    }

    /// Prints `event`; never stops the run (write errors are ignored: the
    /// display is best effort and must not end a training run).
    pub fn event(&mut self, event: &TrainEvent) -> ControlFlow<()> {
        let _ = self.write(event);
        ControlFlow::Continue(())
    }

    fn write(&mut self, event: &TrainEvent) -> std::io::Result<()> {
        match event {
            TrainEvent::Start { iters, start, trainable_parameters, train_records, valid_records } => {
                self.iters = *iters;
                writeln!(
                    self.out,
                    "Training {trainable_parameters} adapter parameters on {train_records} records \
                     ({valid_records} for validation), iterations {}..={iters}",
                    start + 1
                )
            }
            TrainEvent::Train(r) => writeln!(
                self.out,
                "Iter {}/{}: train loss {:.3}, lr {:.3e}, {:.1} it/s, {:.1} tok/s, trained tokens {}, peak mem {:.3} GB",
                r.iteration,
                self.iters,
                r.loss,
                r.learning_rate,
                r.iterations_per_second,
                r.tokens_per_second,
                r.trained_tokens,
                r.peak_memory as f64 / 1e9
            ),
            TrainEvent::Eval { iteration, val_loss, seconds } => {
                writeln!(self.out, "Iter {iteration}: val loss {val_loss:.3}, val took {seconds:.3}s")
            }
            TrainEvent::Saved { iteration, checkpoint } => {
                writeln!(self.out, "Iter {iteration}: saved adapter weights to {}", checkpoint.display())
            }
            TrainEvent::Resumed { iteration, weights, note } => {
                if let Some(note) = note {
                    writeln!(self.out, "Note: {note}")?;
                }
                writeln!(self.out, "Resuming after iteration {iteration} from {}", weights.display())
            }
        }
    }
}

/// Writes each event as one JSON object per line (`{"event": "train", ...}`).
pub struct JsonLinesWriter<W: Write> {
    out: W,
}

impl<W: Write> JsonLinesWriter<W> {
    /// A writer to `out`.
    pub fn new(out: W) -> Self {
        JsonLinesWriter { out }
    }

    /// Writes `event`; stops the run when the output is gone (a closed pipe).
    pub fn event(&mut self, event: &TrainEvent) -> ControlFlow<()> {
        let ok = serde_json::to_string(event)
            .ok()
            .is_some_and(|line| writeln!(self.out, "{line}").and_then(|()| self.out.flush()).is_ok());
        if ok { ControlFlow::Continue(()) } else { ControlFlow::Break(()) }
    }
}

/// The tokeniser and chat template of a model directory.
pub fn load_encoding(model_dir: &Path, model_type: &str) -> TrainResult<(Tokenizer, ChatTemplate)> {
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    let template = ChatTemplate::for_model(&tokenizer, model_type)?;
    Ok((tokenizer, template))
}

/// Runs a training: loads the model and the data, attaches the adapter (or
/// restores it with `resume`), trains for `iters` iterations, evaluates,
/// saves, and reports every event to `on_event`, which can stop the run
/// (the adapter is saved first).
///
/// Runs on the calling thread, on its MLX device.
///
/// # Errors
///
/// Bad settings, a missing model or data file, bad records (with file and
/// line), or an MLX failure.
pub fn train(
    config: &TrainConfig,
    mut on_event: impl FnMut(&TrainEvent) -> ControlFlow<()>,
) -> TrainResult<TrainSummary> {
    config.validate()?;
    let train_file = config.data.join("train.jsonl");
    if !train_file.is_file() {
        return Err(Error::data(&train_file, None, "the training file does not exist"));
    }
    let resumable = if config.resume {
        Some(resume::find_resumable(&config.adapter_path)?)
    } else {
        resume::check_fresh_dir(&config.adapter_path)?;
        None
    };
    let loaded = mlx_metal::model::load(&config.model)?;
    let (tokenizer, template) = load_encoding(&loaded.dir, &loaded.config.model_type)?;
    let enc = Encoder { tokenizer: &tokenizer, template: &template };
    let train_set = Dataset::load(&train_file, &enc, &config.dataset)?;
    let valid_file = config.data.join("valid.jsonl");
    let valid_set = if valid_file.is_file() { Some(Dataset::load(&valid_file, &enc, &config.dataset)?) } else { None };
    let max_len = config.dataset.max_seq_length;
    let mut stream = BatchStream::new(&train_set, config.batch_size, max_len, config.seed)?;

    random::seed(config.seed)?;
    let mut model = loaded.model;
    let dir = &config.adapter_path;
    let mut start = 0usize;
    let mut trained_tokens = 0usize;
    let mut trainer = if let Some(saved) = &resumable {
        resume::check_matches(&config.lora, saved, model.as_mut(), dir)?;
        let mut trainer =
            Trainer::new(model, saved.config.clone(), lora_dtype(config.lora.dtype), config.step_settings())?;
        let meta = trainer.restore(&saved.weights, &saved.state)?;
        start = saved.iteration;
        trained_tokens = meta.get("trained_tokens").and_then(|s| s.parse().ok()).unwrap_or(0);
        for _ in 0..start {
            stream.next_indices();
        }
        trainer
    } else {
        let acfg = adapter_config(&config.lora, model.num_layers());
        let trainer = Trainer::new(model, acfg, lora_dtype(config.lora.dtype), config.step_settings())?;
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The directory's own entry, so that a crash cannot lose it with everything saved in it.
            mlx::io::sync_dir(parent)?;
        }
        // The config, then a pair at iteration 0, so that a run stopped before its first save resumes.
        trainer.adapter_config().save(dir)?;
        resume::save_checkpoint(&trainer, dir, 0, 0, false)?;
        trainer
    };
    trainer.set_training(true)?;
    let mut summary = TrainSummary {
        iterations: start,
        last_loss: None,
        last_val_loss: None,
        adapter_path: dir.clone(),
        stopped: false,
    };
    let mut emit = |e: TrainEvent| on_event(&e).is_break();
    let mut stop = false;
    if let Some(saved) = resumable {
        stop |= emit(TrainEvent::Resumed { iteration: saved.iteration, weights: saved.weights, note: saved.note });
    }
    stop |= emit(TrainEvent::Start {
        iters: config.iters,
        start,
        trainable_parameters: trainer.parameter_count(),
        train_records: train_set.len(),
        valid_records: valid_set.as_ref().map_or(0, Dataset::len),
    });
    summary.stopped = stop;
    let (mut window_loss, mut window_steps, mut window_tokens) = (0f64, 0usize, 0usize);
    let mut window_start = Instant::now();
    let mut it = start;
    while !summary.stopped && it < config.iters {
        it += 1;
        if let Some(valid) = &valid_set
            && config.steps_per_eval > 0
            && (it == start + 1 || it.is_multiple_of(config.steps_per_eval) || it == config.iters)
        {
            let t = Instant::now();
            let val_loss = trainer.evaluate(valid, config.batch_size, config.val_batches, max_len)?;
            summary.last_val_loss = Some(val_loss);
            summary.stopped |=
                emit(TrainEvent::Eval { iteration: it - 1, val_loss, seconds: t.elapsed().as_secs_f64() });
            window_start += t.elapsed();
        }
        let batch = stream.next_batch()?;
        let out = trainer.step(&batch)?;
        window_loss += f64::from(out.loss);
        window_steps += 1;
        window_tokens += out.ntoks;
        trained_tokens += out.ntoks;
        summary.iterations = it;
        if it.is_multiple_of(config.steps_per_report) || it == config.iters {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let loss = (window_loss / window_steps as f64) as f32;
            summary.last_loss = Some(loss);
            summary.stopped |= emit(TrainEvent::Train(StepReport {
                iteration: it,
                loss,
                learning_rate: out.learning_rate,
                tokens_per_second: window_tokens as f64 / secs,
                iterations_per_second: window_steps as f64 / secs,
                trained_tokens,
                peak_memory: memory::peak_memory()?,
                active_memory: memory::active_memory()?,
            }));
            (window_loss, window_steps, window_tokens) = (0.0, 0, 0);
            window_start = Instant::now();
        }
        if config.save_every > 0 && it.is_multiple_of(config.save_every) {
            let checkpoint = save_all(&trainer, dir, it, trained_tokens)?;
            summary.stopped |= emit(TrainEvent::Saved { iteration: it, checkpoint });
        }
    }
    if config.save_every == 0 || !it.is_multiple_of(config.save_every) {
        let checkpoint = save_all(&trainer, dir, it, trained_tokens)?;
        emit(TrainEvent::Saved { iteration: it, checkpoint });
    }
    Ok(summary)
}

/// Saves a checkpoint of `iteration` (see [`resume::save_checkpoint`] for
/// what is written, and in which order).
fn save_all(trainer: &Trainer, dir: &Path, iteration: usize, trained_tokens: usize) -> TrainResult<PathBuf> {
    resume::save_checkpoint(trainer, dir, iteration, trained_tokens, true)
}

/// Loads `model` with the adapter in `adapter`, fuses the adapter into the
/// weights (re-quantising a quantised base with its own group size and
/// bits) and writes a standalone model directory to `out` (see
/// [`lora::fuse_and_save`]: built beside it and moved into place whole).
/// `out` must be new or empty unless `if_exists` is
/// [`IfExists::Replace`](lora::IfExists::Replace); it may never be, or
/// contain, the model or the adapter directory. Returns the fused layers.
///
/// # Errors
///
/// `out` refused (naming it and what it holds), a missing or mismatched
/// adapter, or an I/O or MLX failure.
pub fn fuse(model: &Path, adapter: &Path, out: &Path, if_exists: lora::IfExists) -> TrainResult<Vec<String>> {
    let keep = [("the adapter directory", adapter)];
    lora::check_fuse_output(model, out, &keep, if_exists)?;
    let mut loaded = mlx_metal::model::load(model)?;
    lora::load_adapter(loaded.model.as_mut(), adapter)?;
    Ok(lora::fuse_and_save(&mut loaded, out, &keep, if_exists)?)
}
