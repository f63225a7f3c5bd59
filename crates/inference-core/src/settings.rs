// SPDX-License-Identifier: EUPL-1.2
//! Settings for generation and for loading a model.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Constraint, Error, Result, ToolChoice};

/// The most alternatives a token carries ([`GenerateSettings::top_logprobs`]; OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The most [`GenerateSettings::stop_strings`] (each is looked for after every token).
pub const MAX_STOP_STRINGS: usize = 64;

/// The longest stop string, in bytes (text that may still become one is held back).
pub const MAX_STOP_STRING_BYTES: usize = 1024;

/// The highest [`GenerateSettings::temperature`]: logits divided by more than this are flat to
/// within a few percent for any model, so a larger value is almost surely a mistake.
pub const MAX_TEMPERATURE: f32 = 100.0;

/// Whether each generated token carries the distribution it was sampled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogitsMode {
    /// No distribution (the default; fastest).
    #[default]
    None,
    /// Raw logits, before temperature and filtering.
    Logits,
    /// Log-probabilities (log-softmax of the raw logits).
    LogProbs,
}

/// How to sample: every field has a default that means "off" or "as the model does".
///
/// Plain public fields with chainable setters of the same name. Backends call
/// [`validate`](Self::validate) before using the settings.
///
/// ```
/// use inference_core::GenerateSettings;
/// let s = GenerateSettings::new().max_tokens(64).temperature(0.7).top_p(0.9).seed(42);
/// assert!(s.validate().is_ok());
/// let err = GenerateSettings::new().temperature(-1.0).validate().unwrap_err();
/// assert_eq!(err.to_string(), "invalid setting temperature = -1: must be a finite number >= 0");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateSettings {
    /// The most tokens to generate; at least 1. Default 256. Classification ignores it.
    pub max_tokens: usize,
    /// Softmax temperature; 0 (the default) means greedy (arg-max) sampling.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` or `Some(0)` (the default) is off.
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    /// In (0, 1]; 1 (the default) is off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one. In [0, 1]; 0 (the default)
    /// is off.
    pub min_p: f32,
    /// Penalty applied to the logits of recently seen tokens; finite and > 0; 1 (the default) is
    /// off.
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at; at least 1. Default 20.
    pub repetition_context_size: usize,
    /// Token ids that end generation (in addition to the model's end-of-sequence tokens).
    pub stop_tokens: Vec<u32>,
    /// Strings that end generation when they appear in the output; none may be empty.
    pub stop_strings: Vec<String>,
    /// Seed for the sampler's random numbers; `None` (the default) lets the backend choose.
    pub seed: Option<u64>,
    /// Whether tokens carry logits or log-probabilities.
    pub logits: LogitsMode,
    /// `Some(k)`: each token carries its log-probability, its own text and the `k` most likely
    /// tokens at its step ([`Token::top_logprobs`](crate::Token::top_logprobs); OpenAI's
    /// `logprobs` and `top_logprobs`); at most [`MAX_TOP_LOGPROBS`]. `None` (the default): not.
    pub top_logprobs: Option<usize>,
    /// Keep generating past end-of-sequence tokens until `max_tokens` (for benchmarks and parity
    /// tests). Default false. Explicit stop tokens and strings still apply.
    pub ignore_eos: bool,
    /// Tools a chat may call: OpenAI's function objects (`{"type": "function", "function":
    /// {"name", "description", "parameters"}}`), given to the model's chat template (see
    /// [`tools`](crate::tools)). Empty (the default): none. Plain completions ignore them.
    pub tools: Vec<serde_json::Value>,
    /// Which of [`tools`](Self::tools) the model may call; `Required` and `Function` are
    /// enforced by constrained decoding.
    pub tool_choice: ToolChoice,
    /// Whether a forced call ([`ToolChoice::Required`] or [`ToolChoice::Function`]) may be
    /// several calls in a row (OpenAI's `parallel_tool_calls`). Default true.
    pub parallel_tool_calls: bool,
    /// What the output must match, enforced token by token (structured output); `None` (the
    /// default): anything.
    pub constraint: Option<Constraint>,
}

impl Default for GenerateSettings {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_context_size: 20,
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            seed: None,
            logits: LogitsMode::None,
            top_logprobs: None,
            ignore_eos: false,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: true,
            constraint: None,
        }
    }
}

impl GenerateSettings {
    /// The defaults: 256 tokens, greedy, no filtering, no penalty.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// Sets [`max_tokens`](Self::max_tokens).
        max_tokens(n: usize) = n;
        /// Sets [`temperature`](Self::temperature).
        temperature(t: f32) = t;
        /// Sets [`top_k`](Self::top_k); 0 turns it off.
        top_k(k: usize) = Some(k);
        /// Sets [`top_p`](Self::top_p).
        top_p(p: f32) = p;
        /// Sets [`min_p`](Self::min_p).
        min_p(p: f32) = p;
        /// Sets [`repetition_penalty`](Self::repetition_penalty).
        repetition_penalty(penalty: f32) = penalty;
        /// Sets [`repetition_context_size`](Self::repetition_context_size).
        repetition_context_size(n: usize) = n;
        /// Replaces [`stop_tokens`](Self::stop_tokens).
        stop_tokens(ids: impl IntoIterator<Item = u32>) = ids.into_iter().collect();
        /// Replaces [`stop_strings`](Self::stop_strings).
        stop_strings<S: Into<String>>(strings: impl IntoIterator<Item = S>) = strings.into_iter().map(Into::into).collect();
        /// Sets [`seed`](Self::seed).
        seed(seed: u64) = Some(seed);
        /// Sets [`logits`](Self::logits).
        logits(mode: LogitsMode) = mode;
        /// Sets [`top_logprobs`](Self::top_logprobs).
        top_logprobs(k: usize) = Some(k);
        /// Sets [`ignore_eos`](Self::ignore_eos).
        ignore_eos(ignore: bool) = ignore;
        /// Replaces [`tools`](Self::tools).
        tools(tools: impl IntoIterator<Item = serde_json::Value>) = tools.into_iter().collect();
        /// Sets [`tool_choice`](Self::tool_choice).
        tool_choice(choice: ToolChoice) = choice;
        /// Sets [`parallel_tool_calls`](Self::parallel_tool_calls).
        parallel_tool_calls(parallel: bool) = parallel;
        /// Sets [`constraint`](Self::constraint).
        constraint(c: Constraint) = Some(c);
    }

    /// Whether sampling is greedy (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The top-k filter in effect: `None` when off (unset or 0).
    pub fn effective_top_k(&self) -> Option<usize> {
        self.top_k.filter(|&k| k > 0)
    }

    /// Checks every field against its allowed range.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for the first field out of range, naming the field, the value and
    /// the allowed range, for example `invalid setting top_p = 0: must be in (0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(Error::invalid_setting("max_tokens", 0, "must be at least 1"));
        }
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(Error::invalid_setting("temperature", t, "must be a finite number >= 0"));
        }
        if t > MAX_TEMPERATURE {
            return Err(Error::invalid_setting(
                "temperature",
                t,
                format!("must be at most {MAX_TEMPERATURE} (beyond it any model's choice is noise)"),
            ));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::invalid_setting("top_p", p, "must be in (0, 1]"));
        }
        let p = self.min_p;
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid_setting("min_p", p, "must be in [0, 1]"));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(Error::invalid_setting("repetition_penalty", r, "must be a finite number > 0"));
        }
        if self.repetition_context_size == 0 {
            return Err(Error::invalid_setting("repetition_context_size", 0, "must be at least 1"));
        }
        if let Some(i) = self.stop_strings.iter().position(String::is_empty) {
            return Err(Error::invalid_setting(format!("stop_strings[{i}]"), "\"\"", "must not be empty"));
        }
        if self.stop_strings.len() > MAX_STOP_STRINGS {
            return Err(Error::invalid_setting(
                "stop_strings",
                format!("{} strings", self.stop_strings.len()),
                format!("at most {MAX_STOP_STRINGS} are allowed"),
            ));
        }
        if let Some(i) = self.stop_strings.iter().position(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return Err(Error::invalid_setting(
                format!("stop_strings[{i}]"),
                format!("{} bytes", self.stop_strings[i].len()),
                format!("must be at most {MAX_STOP_STRING_BYTES} bytes"),
            ));
        }
        if let Some(k) = self.top_logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::invalid_setting("top_logprobs", k, format!("must be at most {MAX_TOP_LOGPROBS}")));
        }
        crate::tools::validate_tools(&self.tools)?;
        match &self.tool_choice {
            ToolChoice::Required if self.tools.is_empty() => {
                return Err(Error::invalid_setting("tool_choice", "required", "needs at least one tool"));
            }
            ToolChoice::Function(name)
                if !self.tools.iter().any(|t| t.pointer("/function/name").and_then(|n| n.as_str()) == Some(name)) =>
            {
                return Err(Error::invalid_setting("tool_choice", name, "names no tool in tools"));
            }
            ToolChoice::Required | ToolChoice::Function(_) if self.constraint.is_some() => {
                return Err(Error::invalid_setting(
                    "tool_choice",
                    "required",
                    "cannot be combined with a constraint (forcing a call is one)",
                ));
            }
            _ => {}
        }
        if let Some(c) = &self.constraint {
            c.validate()?;
        }
        Ok(())
    }
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The backend's best device: the GPU when there is one, else the CPU (the default).
    #[default]
    Auto,
    /// The GPU; loading fails when there is none.
    Gpu,
    /// The CPU.
    Cpu,
}

impl Device {
    /// The lower-case name: `auto`, `gpu` or `cpu`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Gpu => "gpu",
            Self::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Device {
    type Err = Error;

    /// Parses `auto`, `gpu` or `cpu`, ignoring case and surrounding white space.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            _ => Err(Error::invalid_setting("device", format!("{s:?}"), "must be one of auto, gpu, cpu")),
        }
    }
}

/// The floating-point type a model computes in: its weights are cast to it at load, and its
/// activations and KV cache follow.
///
/// `Auto` (the default) lets the backend choose what runs fastest on the device it loads on; the
/// `metal` backend picks float32 for a 16-bit checkpoint on an x86_64 CPU with an optimised BLAS
/// (MLX's CPU matmuls reach BLAS only in float32), dequantises a quantised checkpoint to float32
/// on a CPU when a matmul timed at load says that is faster and the dense weights fit, and keeps
/// the checkpoint's own type everywhere else (a GPU, Apple Silicon). The other values cast every
/// floating-point weight, as mlx-lm's `model.set_dtype(...)` does; the `metal` backend's
/// `Float32` also dequantises a quantised checkpoint (its backend option `quantised` overrides).
///
/// ```
/// use inference_core::ComputeDtype;
/// assert_eq!("bf16".parse::<ComputeDtype>().unwrap(), ComputeDtype::Bfloat16);
/// assert_eq!(ComputeDtype::Float32.to_string(), "float32");
/// let err = "double".parse::<ComputeDtype>().unwrap_err();
/// assert_eq!(err.to_string(), "invalid setting dtype = \"double\": must be one of auto, float32, bfloat16, float16");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// The backend's choice for the device (the default).
    #[default]
    Auto,
    /// 32-bit floats.
    Float32,
    /// bfloat16.
    Bfloat16,
    /// IEEE half precision.
    Float16,
}

impl ComputeDtype {
    /// Every value, in the order the help text lists them.
    pub const ALL: [ComputeDtype; 4] = [Self::Auto, Self::Float32, Self::Bfloat16, Self::Float16];

    /// The lower-case name: `auto`, `float32`, `bfloat16` or `float16` (MLX's dtype names).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Float32 => "float32",
            Self::Bfloat16 => "bfloat16",
            Self::Float16 => "float16",
        }
    }

    /// Whether the backend chooses.
    pub fn is_auto(self) -> bool {
        self == Self::Auto
    }
}

impl fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ComputeDtype {
    type Err = Error;

    /// Parses `auto`, `float32`, `bfloat16` or `float16` (also `f32`, `bf16`, `f16`), ignoring
    /// case and surrounding white space.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "float32" | "f32" => Ok(Self::Float32),
            "bfloat16" | "bf16" => Ok(Self::Bfloat16),
            "float16" | "f16" => Ok(Self::Float16),
            _ => Err(Error::invalid_setting(
                "dtype",
                format!("{s:?}"),
                "must be one of auto, float32, bfloat16, float16",
            )),
        }
    }
}

/// How to load a model.
///
/// ```
/// use inference_core::{Device, LoadSettings};
/// let s = LoadSettings::new()
///     .backend("mlx_lm")
///     .device(Device::Cpu)
///     .backend_option("python", "/usr/bin/python3");
/// assert!(s.validate().is_ok());
/// assert_eq!(s.backend_options["python"], "/usr/bin/python3");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadSettings {
    /// The backend's registered name; `None` uses the registry's default backend.
    pub backend: Option<String>,
    /// The context length to allocate for; `None` uses the model's own.
    pub context_length: Option<usize>,
    /// Where to run.
    pub device: Device,
    /// The floating-point type to compute in (see [`ComputeDtype`]); `auto` by default.
    pub dtype: ComputeDtype,
    /// A LoRA adapter to apply at load (a directory with adapter_config.json and safetensors).
    pub adapter_path: Option<PathBuf>,
    /// Backend-specific knobs, for example `python` (the interpreter) for the `mlx_lm` backend.
    /// Each backend documents the keys it reads and rejects keys it does not know.
    pub backend_options: BTreeMap<String, String>,
}

impl LoadSettings {
    /// The defaults: default backend, model's context length, automatic device and compute type,
    /// no adapter.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// Sets [`backend`](Self::backend).
        backend(name: impl Into<String>) = Some(name.into());
        /// Sets [`context_length`](Self::context_length).
        context_length(n: usize) = Some(n);
        /// Sets [`device`](Self::device).
        device(device: Device) = device;
        /// Sets [`dtype`](Self::dtype).
        dtype(dtype: ComputeDtype) = dtype;
        /// Sets [`adapter_path`](Self::adapter_path).
        adapter_path(path: impl Into<PathBuf>) = Some(path.into());
    }

    /// Adds (or replaces) one of [`backend_options`](Self::backend_options).
    #[must_use]
    pub fn backend_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.backend_options.insert(key.into(), value.into());
        self
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for an empty backend name, a zero context length, an empty
    /// adapter path or an empty backend option key.
    pub fn validate(&self) -> Result<()> {
        if self.backend.as_deref() == Some("") {
            return Err(Error::invalid_setting(
                "backend",
                "\"\"",
                "must not be empty (leave it unset for the default backend)",
            ));
        }
        if self.context_length == Some(0) {
            return Err(Error::invalid_setting(
                "context_length",
                0,
                "must be at least 1 (leave it unset for the model's own)",
            ));
        }
        if self.adapter_path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(Error::invalid_setting("adapter_path", "\"\"", "must not be empty"));
        }
        if self.backend_options.contains_key("") {
            return Err(Error::invalid_setting("backend_options", "key \"\"", "keys must not be empty"));
        }
        Ok(())
    }
}
