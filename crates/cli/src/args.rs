// SPDX-License-Identifier: EUPL-1.2
//! The command line: subcommands and their flags, and how the shared flags become
//! [`LoadSettings`] and [`GenerateSettings`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use inference_core::{ComputeDtype, Constraint, Device, GenerateSettings, LoadSettings, TextModel};

use crate::failure::Failure;

/// mlxr — run and fine-tune LLMs on MLX.
#[derive(Debug, Parser)]
#[command(name = "mlxr", version, about = "mlxr — run and fine-tune LLMs on MLX", propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Generate a continuation of one prompt (an argument, or standard input), streamed; with
    /// --tensor-parallel N, by a model split over N processes.
    Generate(GenerateArgs),
    /// Talk with a model, turn by turn; /help lists the commands.
    Chat(ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API.
    ///
    /// Endpoints: POST /v1/chat/completions and /v1/completions (with "stream": true for
    /// server-sent events), GET /v1/models and /health. Requests without a temperature are greedy,
    /// as with mlx-lm's server; top_k, min_p, repetition_penalty and ignore_eos are accepted beside
    /// OpenAI's fields. Ctrl-C stops the server, cancelling running generations. With
    /// --tensor-parallel N the model is split over N processes of mlxr; only rank 0 listens.
    Serve(ServeArgs),
    /// Find model directories under a directory and print them as a table.
    Models(ModelsArgs),
    /// Print the device and MLX version, and a model's shape when one is given.
    Info(InfoArgs),
    /// Measure prefill and decode speed on a model (the engine's own loop; JSON on stdout).
    #[cfg(feature = "metal")]
    Bench(BenchArgs),
    /// Fine-tune a LoRA adapter on a dataset directory (train.jsonl, valid.jsonl in mlx-lm's
    /// formats); the adapter loads in mlx-lm, and here with `--adapter DIR`.
    #[cfg(feature = "metal")]
    Lora(crate::train::LoraArgs),
    /// Fold a LoRA adapter into its base model and save a standalone model directory
    /// (re-quantising a quantised base).
    #[cfg(feature = "metal")]
    Fuse(crate::train::FuseArgs),
    /// Convert a Hugging Face checkpoint to an MLX model, optionally quantised, as mlx_lm.convert
    /// writes it (same tensors, config.json and shards).
    #[cfg(feature = "metal")]
    Convert(crate::convert::ConvertArgs),
    /// Print a shell completion script: `mlxr completions bash > ~/.local/share/bash-completion/completions/mlxr`.
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub(crate) shell: clap_complete::Shell,
}

/// Which model to load and how.
#[derive(Debug, Clone, Args)]
pub(crate) struct ModelArgs {
    /// The model directory (config.json, tokenizer and safetensors).
    #[arg(short, long, value_name = "DIR")]
    pub(crate) model: PathBuf,
    /// The backend: `metal` (native MLX) or `mlx_lm` (Python mlx-lm); default: the first
    /// available.
    #[arg(long, value_name = "NAME")]
    pub(crate) backend: Option<String>,
    /// Where to run: auto, gpu or cpu.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub(crate) device: Device,
    /// The floating-point type to compute in: auto, float32, bfloat16 or float16. auto: float32
    /// for a 16-bit checkpoint on an x86_64 CPU with an optimised BLAS, a quantised checkpoint
    /// dequantised to float32 on a CPU where that measures faster, the checkpoint's own type
    /// elsewhere (`mlx_lm` backend: mlx-lm's own). float32 dequantises quantised checkpoints.
    #[arg(long, default_value = "auto", value_name = "TYPE", value_parser = parse_dtype)]
    pub(crate) dtype: ComputeDtype,
    /// A quantised checkpoint's layers (metal backend): auto (as --dtype implies), keep or
    /// dequantise.
    #[arg(long, value_name = "HOW", value_parser = ["auto", "keep", "dequantise"])]
    pub(crate) quantised: Option<String>,
    /// The context length to allocate for (default: the model's own); generation stops when it
    /// is full. mlx-lm's --max-kv-size is taken as this (a bound, not a rotating window).
    #[arg(long, visible_alias = "max-kv-size", value_name = "TOKENS")]
    pub(crate) context_length: Option<usize>,
    /// A LoRA adapter directory to apply at load; `mlxr serve` also takes NAME=DIR, repeatable,
    /// to serve each adapter as model NAME beside the base.
    #[arg(long, visible_alias = "adapter-path", value_name = "[NAME=]DIR", value_parser = crate::adapter_arg::parse)]
    pub(crate) adapter: Vec<crate::adapter_arg::AdapterArg>,
    /// The Python interpreter (or virtualenv) for the `mlx_lm` backend (default: $MLXR_PYTHON,
    /// else python3).
    #[arg(long, value_name = "PATH")]
    pub(crate) python: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) kv: KvCacheArgs,
    #[command(flatten)]
    pub(crate) speculative: SpeculativeArgs,
}

/// Speculative decoding (metal backend; mlx-lm's --draft-model and --num-draft-tokens): tokens
/// guessed cheaply and checked by the model in one forward pass, while a request decodes alone.
/// Greedy output is exactly that of plain decoding; sampled output follows the same distribution.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct SpeculativeArgs {
    /// A smaller model with the same tokenizer whose greedy continuation the model checks.
    #[arg(long, value_name = "DIR", conflicts_with = "prompt_lookup")]
    pub(crate) draft_model: Option<PathBuf>,
    /// Guess by prompt lookup: what followed the latest earlier occurrence of the text's last
    /// tokens (for answers that repeat their input: code edits, summaries, quotations).
    #[arg(long)]
    pub(crate) prompt_lookup: bool,
    /// With --prompt-lookup, the longest n-gram matched (default 3; shorter ones are tried next).
    #[arg(long, value_name = "N", requires = "prompt_lookup", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) prompt_lookup_ngram: Option<u32>,
    /// Most tokens guessed per step (default 3 with a draft model, 8 with prompt lookup).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) num_draft_tokens: Option<u32>,
}

impl SpeculativeArgs {
    /// `settings` with the backend options these flags give.
    pub(crate) fn load_settings(&self, mut settings: LoadSettings) -> LoadSettings {
        if let Some(dir) = &self.draft_model {
            settings = settings.backend_option("draft_model", dir.to_string_lossy());
        }
        if self.prompt_lookup {
            let n = self.prompt_lookup_ngram.map_or_else(|| "true".to_owned(), |n| n.to_string());
            settings = settings.backend_option("prompt_lookup", n);
        }
        if let Some(n) = self.num_draft_tokens {
            settings = settings.backend_option("num_draft_tokens", n.to_string());
        }
        settings
    }
}

/// The quantised KV cache (metal backend; mlx-lm's flags of the same names). Part of the model's
/// load settings, so every rank of a tensor-parallel job quantises alike.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct KvCacheArgs {
    /// Quantise the KV cache to 4 or 8 bits (default: full precision).
    #[arg(long, value_name = "BITS", value_parser = ["4", "8"])]
    pub(crate) kv_bits: Option<String>,
    /// Elements of a head per scale and bias in the quantised KV cache (default 64).
    #[arg(long, value_name = "N", value_parser = ["32", "64", "128"])]
    pub(crate) kv_group_size: Option<String>,
    /// With --kv-bits, the cache stays full precision until it holds this many positions
    /// (default 5000, as mlx-lm).
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32))]
    pub(crate) quantized_kv_start: Option<u32>,
}

impl KvCacheArgs {
    /// `settings` with the backend options these flags give.
    pub(crate) fn load_settings(&self, mut settings: LoadSettings) -> LoadSettings {
        let options = [
            ("kv_bits", self.kv_bits.clone()),
            ("kv_group_size", self.kv_group_size.clone()),
            ("quantized_kv_start", self.quantized_kv_start.map(|n| n.to_string())),
        ];
        for (key, value) in options {
            if let Some(v) = value {
                settings = settings.backend_option(key, v);
            }
        }
        settings
    }
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse::<Device>().map_err(|e| e.to_string())
}

fn parse_dtype(s: &str) -> Result<ComputeDtype, String> {
    s.parse::<ComputeDtype>().map_err(|e| e.to_string())
}

impl ModelArgs {
    /// The load settings these flags ask for.
    pub(crate) fn load_settings(&self) -> LoadSettings {
        let mut s = LoadSettings::new().device(self.device).dtype(self.dtype);
        s.backend = self.backend.clone();
        s.context_length = self.context_length;
        s.adapter_path = self.adapter.iter().find(|a| a.name.is_none()).map(|a| a.dir.clone());
        if let Some(python) = &self.python {
            s = s.backend_option("python", python.to_string_lossy());
        }
        if let Some(how) = &self.quantised {
            s = s.backend_option("quantised", how);
        }
        self.speculative.load_settings(self.kv.load_settings(s))
    }

    /// Loads the model with `settings` (these flags' settings, amended), logging how long it took.
    pub(crate) fn load_with(&self, settings: LoadSettings) -> Result<Box<dyn TextModel>, Failure> {
        crate::adapter_arg::at_load(&self.adapter, false)?;
        let started = Instant::now();
        let model = {
            let _spinner = spinner(format!("loading {}", self.model.display()));
            load_model(&self.model, &settings)?
        };
        tracing::info!(model = %self.model.display(), seconds = started.elapsed().as_secs_f64(), "model loaded");
        Ok(model)
    }
}

/// A spinner with `what` and the time so far (a model loading, a fuse writing), on a terminal
/// only; gone when dropped.
#[cfg(feature = "metal")]
pub(crate) fn spinner(what: String) -> Option<impl Drop> {
    use std::io::IsTerminal;
    struct Spinner(indicatif::ProgressBar);
    impl Drop for Spinner {
        fn drop(&mut self) {
            self.0.finish_and_clear();
        }
    }
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    Some(Spinner(bar))
}

#[cfg(not(feature = "metal"))]
pub(crate) fn spinner(_: String) -> Option<()> {
    None
}

/// Loads through the process-wide registry, which checks that the named backend can run with
/// these settings (for `mlx_lm`, the interpreter `--python` names) before loading.
pub(crate) fn load_model(path: &Path, settings: &LoadSettings) -> Result<Box<dyn TextModel>, inference_core::Error> {
    inference_core::load_model(path, settings)
}

/// Tensor parallelism: the model split over several processes on this machine.
#[derive(Debug, Clone, Args)]
pub(crate) struct TensorParallelArgs {
    /// Split the model over N processes (tensor parallelism, `metal` backend): mlxr starts N
    /// copies of itself with the same arguments; rank 0 reads the prompt, prints or serves, and
    /// the other ranks mirror its work. Ctrl-C or SIGTERM to this process ends every rank.
    /// 1 is off.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) tensor_parallel: u32,
    /// How the ranks talk: ring (TCP over loopback, any device), nccl (one CUDA GPU per rank) or
    /// any (MLX's first that works).
    #[arg(long, value_name = "NAME", default_value = "ring", value_parser = ["ring", "nccl", "any"])]
    pub(crate) distributed_backend: String,
    /// How long the ranks wait for each other to start, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub(crate) distributed_timeout: f64,
    /// How long rank 0 lets one step (or job) of the ranks take before it ends the job with an
    /// error naming the rank that did not take part, in seconds: a rank that hangs would
    /// otherwise hold every rank forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub(crate) step_timeout: f64,
}

impl TensorParallelArgs {
    /// `settings` with the backend options that make the model one rank of the job (the
    /// `metal` backend), or unchanged for one process.
    pub(crate) fn load_settings(&self, settings: LoadSettings) -> LoadSettings {
        if self.tensor_parallel <= 1 {
            return settings;
        }
        let mut s = settings
            .backend_option("tensor_parallel", self.tensor_parallel.to_string())
            .backend_option("distributed_backend", self.distributed_backend.as_str())
            .backend_option("distributed_timeout_s", self.distributed_timeout.to_string())
            .backend_option("tp_step_timeout_s", self.step_timeout.to_string());
        s.backend = Some("metal".to_owned());
        s
    }
}

/// How to sample; the defaults are [`GenerateSettings`]'s (greedy, 256 tokens).
#[derive(Debug, Clone, Args)]
pub(crate) struct SamplingArgs {
    /// The most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, visible_alias = "temp", allow_negative_numbers = true, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Nucleus sampling threshold, in (0, 1]; 1 is off.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub(crate) top_p: f32,
    /// Keep only the k most likely tokens; 0 is off.
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one; 0 is off.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub(crate) min_p: f32,
    /// Penalty on recently seen tokens; 1 is off.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub(crate) repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    #[arg(long, default_value_t = 20)]
    pub(crate) repetition_context_size: usize,
    /// A string that ends generation (repeat for several).
    #[arg(long = "stop", value_name = "TEXT")]
    pub(crate) stop: Vec<String>,
    /// Seed for the sampler.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens, up to --max-tokens.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// The output must be JSON valid against the JSON Schema in this file (constrained decoding).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub(crate) json_schema: Option<PathBuf>,
    /// The output must match this regular expression from start to end.
    #[arg(long, value_name = "PATTERN", group = "constraint")]
    pub(crate) regex: Option<String>,
    /// The output must match the Lark grammar in this file (llguidance's dialect).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub(crate) grammar: Option<PathBuf>,
}

impl SamplingArgs {
    /// The generation settings, validated.
    ///
    /// # Errors
    ///
    /// The first flag out of range, named as its flag.
    pub(crate) fn settings(&self) -> Result<GenerateSettings, Failure> {
        let mut s = GenerateSettings::new()
            .max_tokens(self.max_tokens)
            .temperature(self.temperature)
            .top_p(self.top_p)
            .top_k(self.top_k)
            .min_p(self.min_p)
            .repetition_penalty(self.repetition_penalty)
            .repetition_context_size(self.repetition_context_size)
            .stop_strings(self.stop.iter().cloned())
            .ignore_eos(self.ignore_eos);
        s.seed = self.seed;
        s.constraint = self.constraint()?;
        s.validate().map_err(|e| match e {
            inference_core::Error::InvalidSetting { name, value, reason } => {
                let flag = match name.as_str() {
                    n if n.starts_with("stop_strings") => "stop".to_owned(),
                    "constraint.json_schema" => "json-schema".to_owned(),
                    n if n.starts_with("constraint.") => n["constraint.".len()..].to_owned(),
                    n => n.replace('_', "-"),
                };
                Failure::new(format!("--{flag} {value}: {reason}"))
            }
            other => Failure::from(other),
        })?;
        Ok(s)
    }
}

impl SamplingArgs {
    /// The constraint `--json-schema`, `--regex` or `--grammar` asks for (one at most).
    fn constraint(&self) -> Result<Option<Constraint>, Failure> {
        let read = |flag: &str, path: &Path| {
            std::fs::read_to_string(path).map_err(|e| Failure::new(format!("--{flag} {}: {e}", path.display())))
        };
        if let Some(path) = &self.json_schema {
            let text = read("json-schema", path)?;
            let schema = serde_json::from_str(&text)
                .map_err(|e| Failure::new(format!("--json-schema {}: not JSON: {e}", path.display())))?;
            return Ok(Some(Constraint::JsonSchema(schema)));
        }
        if let Some(path) = &self.grammar {
            return Ok(Some(Constraint::Lark(read("grammar", path)?)));
        }
        Ok(self.regex.clone().map(Constraint::Regex))
    }
}

#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    /// The prompt; `-` or nothing reads it from standard input.
    pub(crate) prompt: Option<String>,
    /// The prompt, as mlx-lm's generate takes it (instead of the argument).
    #[arg(long = "prompt", short = 'p', value_name = "TEXT", conflicts_with = "prompt")]
    pub(crate) prompt_flag: Option<String>,
    /// Apply the model's chat template (the prompt is the user's message): the default when the
    /// model has one, as in mlx-lm; with this flag, also a built-in template for a model without.
    #[arg(long)]
    pub(crate) chat: bool,
    /// Send the prompt as it stands, without the chat template.
    #[arg(long, visible_alias = "raw", conflicts_with_all = ["chat", "system"])]
    pub(crate) ignore_chat_template: bool,
    /// A system message (implies --chat).
    #[arg(long, visible_alias = "system-prompt", value_name = "TEXT")]
    pub(crate) system: Option<String>,
    /// Print token counts, speeds and peak memory to standard error at the end.
    #[arg(long)]
    pub(crate) metrics: bool,
    /// Print mlx-lm's statistics lines (prompt and generation tokens and speeds, peak memory) to
    /// standard error at the end.
    #[arg(long)]
    pub(crate) verbose: bool,
    #[command(flatten)]
    pub(crate) tensor_parallel: TensorParallelArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    /// The system message to start with (/system changes it).
    #[arg(long, visible_alias = "system-prompt", value_name = "TEXT")]
    pub(crate) system: Option<String>,
    /// After each reply, print cached and new prompt tokens and the speed to standard error.
    #[arg(long)]
    pub(crate) metrics: bool,
    #[command(flatten)]
    pub(crate) tensor_parallel: TensorParallelArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ModelsArgs {
    /// The directory to search (default: $MLXR_MODELS_DIR, else ~/.cache/mlxr/models).
    pub(crate) dir: Option<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct InfoArgs {
    /// A model directory to load and describe.
    #[arg(short, long, value_name = "DIR")]
    pub(crate) model: Option<PathBuf>,
    /// The backend for --model.
    #[arg(long, value_name = "NAME")]
    pub(crate) backend: Option<String>,
    /// Where to load --model: auto, gpu or cpu.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub(crate) device: Device,
    /// The floating-point type to load --model in: auto, float32, bfloat16 or float16.
    #[arg(long, default_value = "auto", value_name = "TYPE", value_parser = parse_dtype)]
    pub(crate) dtype: ComputeDtype,
    /// The Python interpreter for the `mlx_lm` backend.
    #[arg(long, value_name = "PATH")]
    pub(crate) python: Option<PathBuf>,
}

#[cfg(feature = "metal")]
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// The model directory.
    #[arg(short, long, value_name = "DIR")]
    pub(crate) model: PathBuf,
    /// The floating-point type to compute in: auto, float32, bfloat16 or float16.
    #[arg(long, default_value = "auto", value_name = "TYPE", value_parser = parse_dtype)]
    pub(crate) dtype: ComputeDtype,
    /// A quantised checkpoint's layers: auto (as --dtype implies), keep or dequantise.
    #[arg(long, default_value = "auto", value_name = "HOW", value_parser = ["auto", "keep", "dequantise"])]
    pub(crate) quantised: String,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    pub(crate) prompts: Vec<usize>,
    /// Tokens to decode per run (at least 2).
    #[arg(long, default_value_t = 256)]
    pub(crate) decode: usize,
    /// Measured runs per prompt length (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Unmeasured runs first.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Seed of the pseudo-random prompt ids.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Skip the runs through the public API.
    #[arg(long)]
    pub(crate) no_public: bool,
    /// Write the report as JSON to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
}

#[path = "args_serve.rs"]
mod serve_args;
pub(crate) use serve_args::ServeArgs;

#[cfg(test)]
#[path = "args_tests.rs"]
mod tests;
