// SPDX-License-Identifier: EUPL-1.2
//! The model traits: text generation, and the optional capabilities a model may have.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    AttentionSnapshot, BatchResult, CancelToken, ClassifyResult, EngineLoad, Error, GenerateMetrics, GenerateSettings,
    Message, ModelInfo, Result, TokenStream,
};

/// What to generate from: text as it stands, or a conversation for the chat template.
#[derive(Debug, Clone, Copy)]
pub enum PromptInput<'a> {
    /// A continuation of this text ([`TextModel::generate`]).
    Text(&'a str),
    /// The assistant's reply to these messages ([`TextModel::chat`]).
    Chat(&'a [Message]),
}

/// A prompt made ready by [`TextModel::prepare`]: its token ids, checked against the model's
/// context, and the settings the rendering settled (a chat template may add stop rules, or a
/// constraint that forces a tool call).
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedPrompt {
    /// The prompt's token ids.
    pub ids: Vec<u32>,
    /// The settings to generate with.
    pub settings: GenerateSettings,
}

/// A loaded language model.
///
/// Handles are `Send + Sync` and are shared as `Arc<dyn TextModel>`; a backend whose native state
/// is tied to one thread keeps it on its own engine thread and talks to it over channels.
///
/// Every call takes the settings and a [`CancelToken`]. Backends validate the settings
/// ([`GenerateSettings::validate`]) and return [`Error::InvalidSetting`] before doing any work,
/// return [`Error::EmptyPrompt`] for an empty prompt or message list, [`Error::Closed`] after
/// [`close`](Self::close), and [`Error::Unsupported`] for an operation they do not implement.
pub trait TextModel: Send + Sync {
    /// Generates a continuation of `prompt` as it stands (no chat template).
    ///
    /// The stream starts once the call returns; errors found before any work starts (settings,
    /// empty prompt, closed model) are returned here, later ones arrive as the stream's last item.
    ///
    /// # Errors
    ///
    /// See the trait documentation.
    fn generate(&self, prompt: &str, settings: &GenerateSettings, cancel: CancelToken) -> Result<TokenStream>;

    /// Generates the assistant's reply to `messages`, rendered with the model's own chat template.
    ///
    /// # Errors
    ///
    /// See the trait documentation.
    fn chat(&self, messages: &[Message], settings: &GenerateSettings, cancel: CancelToken) -> Result<TokenStream>;

    /// Tokenises `prompt` as [`generate`](Self::generate) or [`chat`](Self::chat) would (a
    /// conversation rendered with the chat template first) and checks it against the context and
    /// the settings, without generating: so that a caller — a server — can refuse a prompt, and
    /// count it, before it takes a generation slot. Run the result with
    /// [`generate_prepared`](Self::generate_prepared). `Ok(None)`: the backend does not prepare
    /// apart from generating (the default); call `generate` or `chat`.
    ///
    /// # Errors
    ///
    /// What `generate` or `chat` would return for the prompt and settings before starting.
    fn prepare(&self, prompt: PromptInput<'_>, settings: &GenerateSettings) -> Result<Option<PreparedPrompt>> {
        let _ = (prompt, settings);
        Ok(None)
    }

    /// Generates from a prompt [`prepare`](Self::prepare) made (its `settings` may be changed
    /// meanwhile: a seed per choice, say; they are checked again).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] from a backend that does not prepare; otherwise as `generate`.
    fn generate_prepared(&self, prompt: &PreparedPrompt, cancel: CancelToken) -> Result<TokenStream> {
        let _ = (prompt, cancel);
        Err(Error::unsupported(self.info().architecture, "generate_prepared"))
    }

    /// Classifies each prompt: one prefill, sampling a single token at the last position (with the
    /// distribution when [`GenerateSettings::logits`] asks for it). Results are in prompt order.
    ///
    /// From a `Vec<String>`: `let prompts: Vec<&str> = owned.iter().map(String::as_str).collect();`
    ///
    /// # Errors
    ///
    /// See the trait documentation; [`Error::Cancelled`] when cancelled part-way.
    fn classify(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> Result<Vec<ClassifyResult>>;

    /// Generates a continuation of each prompt; one result per prompt, in order. A failure of
    /// one prompt is reported in its [`BatchResult`], not as an error of the call. A backend
    /// without real batching may run the prompts one after another
    /// (see [`TokenStream::into_batch_result`]).
    ///
    /// # Errors
    ///
    /// See the trait documentation.
    fn batch_generate(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> Result<Vec<BatchResult>>;

    /// The model's shape.
    fn info(&self) -> ModelInfo;

    /// The measurements of the last call that completed (all zero before the first).
    fn metrics(&self) -> GenerateMetrics;

    /// The architecture name, as config.json's `model_type` gives it (`gemma3`, `qwen3`, `llama`).
    fn model_type(&self) -> &str;

    /// Releases the model's resources. Idempotent: later calls return `Ok(())`; other calls
    /// after it return [`Error::Closed`]. Dropping the handle also releases them, but only
    /// `close` reports failures.
    ///
    /// # Errors
    ///
    /// The first failure while releasing resources.
    fn close(&self) -> Result<()>;

    /// Whether the model can still serve: an error says why not (its engine thread or its child
    /// process has died, or it was closed). A server reports it on its health check and stops,
    /// so that whatever supervises it can start it again. Backends with nothing that can die
    /// alone keep the default, `Ok(())`.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] after [`close`](Self::close); the backend's error naming what died.
    fn health(&self) -> Result<()> {
        Ok(())
    }

    /// What the engine is doing now (queue, running generations, batch size), for backends
    /// that batch requests; `None` for those that do not say.
    fn engine_load(&self) -> Option<EngineLoad> {
        None
    }

    /// The attention-inspection capability, when the model has it.
    fn attention_inspector(&self) -> Option<&dyn AttentionInspector> {
        None
    }

    /// The training capability, when the model has it.
    fn trainer(&self) -> Option<&dyn TrainableModel> {
        None
    }

    /// The capability of serving LoRA adapters beside this model, each as a model of its own
    /// that shares this model's weights, when the backend has it.
    fn adapter_host(&self) -> Option<&dyn AdapterHost> {
        None
    }

    /// Starts a [`ChatSession`]: a conversation that keeps the model's state between turns, so
    /// each turn prefills only what is new.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when the backend has no sessions (the default), [`Error::Closed`].
    fn new_session(&self) -> Result<Box<dyn ChatSession>> {
        Err(Error::unsupported("(this model's backend)", "chat sessions"))
    }
}

/// A conversation that keeps its KV cache across turns.
///
/// Each call takes the **whole** conversation (or the whole raw text) so far. The session
/// compares its tokens with the tokens it has already processed, keeps the longest common
/// prefix, and prefills only the rest; when the history diverges (an edited message, a new
/// system prompt) it falls back to the common prefix, and when nothing can be kept it starts
/// again. The reply is as if the conversation were run fresh: the same tokens, greedy or
/// seeded. The stream's [`GenerateMetrics`] say how many prompt tokens came from the cache
/// ([`cached_prompt_tokens`](GenerateMetrics::cached_prompt_tokens)) and how many were new.
///
/// Turns run one after another; a turn started while another is still streaming waits for it.
pub trait ChatSession: Send {
    /// Generates the assistant's reply to `messages`, rendered with the model's chat template.
    ///
    /// # Errors
    ///
    /// As [`TextModel::chat`].
    fn chat(&mut self, messages: &[Message], settings: &GenerateSettings, cancel: CancelToken) -> Result<TokenStream>;

    /// Generates a continuation of `prompt` (the whole text so far, no chat template).
    ///
    /// # Errors
    ///
    /// As [`TextModel::generate`].
    fn generate(&mut self, prompt: &str, settings: &GenerateSettings, cancel: CancelToken) -> Result<TokenStream>;

    /// How many tokens the session's cache holds now (after any running turn).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] or a backend failure.
    fn cached_tokens(&self) -> Result<usize>;

    /// Forgets everything: the next turn prefills from the start.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] or a backend failure.
    fn reset(&mut self) -> Result<()>;

    /// Saves the session's cache and tokens to `path` (one safetensors file), replacing it
    /// atomically.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when writing fails, or a backend failure.
    fn save(&self, path: &Path) -> Result<()>;

    /// Replaces the session's state with one saved by [`save`](Self::save).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when reading fails, [`Error::InvalidModel`] when the file is not a session
    /// or was saved from a different model; the session is unchanged then.
    fn load(&mut self, path: &Path) -> Result<()>;
}

/// Optional capability: capture the attention keys (and queries) of a prompt.
///
/// Reached through [`TextModel::attention_inspector`].
pub trait AttentionInspector {
    /// Runs one prefill of `prompt` and returns the captured keys (post-norm, post-RoPE) and,
    /// when the backend can capture them, queries.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyPrompt`], [`Error::Cancelled`], [`Error::Closed`] or a backend failure.
    fn inspect_attention(&self, prompt: &str, cancel: CancelToken) -> Result<AttentionSnapshot>;
}

/// Optional capability: LoRA fine-tuning support.
///
/// Reached through [`TextModel::trainer`].
pub trait TrainableModel {
    /// Injects LoRA layers described by `config` into the model and returns their adapter.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for an invalid config, or a backend failure.
    fn apply_lora(&self, config: &LoraConfig) -> Result<Box<dyn Adapter>>;

    /// Tokenises `text` (without adding a beginning-of-sequence token).
    ///
    /// # Errors
    ///
    /// A backend failure, or [`Error::Closed`].
    fn encode(&self, text: &str) -> Result<Vec<u32>>;

    /// Turns token ids back into text.
    ///
    /// # Errors
    ///
    /// A backend failure (an id outside the vocabulary), or [`Error::Closed`].
    fn decode(&self, ids: &[u32]) -> Result<String>;

    /// Number of transformer layers.
    fn num_layers(&self) -> usize;
}

/// Optional capability: LoRA adapters served beside a loaded model.
///
/// Reached through [`TextModel::adapter_host`]. Each adapter becomes a [`TextModel`] of its own
/// that runs the base model's weights (shared, not copied) with the adapter's low-rank update;
/// the base model itself is unchanged. Closing or dropping the adapter's model unloads it:
/// calls after that get [`Error::Closed`], generations already running on it finish first.
pub trait AdapterHost {
    /// Loads the adapter directory `dir` (mlx-lm's layout: `adapter_config.json` and
    /// `adapters.safetensors`) and returns the model that runs with it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] (named `adapter_path`) for a missing directory, a malformed
    /// adapter or one that does not fit this model (its rank, its layers or its shapes), and
    /// [`Error::Unsupported`] where this model cannot serve adapters (a tensor-parallel rank, say),
    /// [`Error::Closed`], or a backend failure.
    fn load_adapter(&self, dir: &Path) -> Result<Box<dyn TextModel>>;
}

/// A set of LoRA layers applied to a model.
pub trait Adapter: Send + Sync {
    /// Number of trainable parameters.
    fn total_params(&self) -> usize;

    /// Saves the adapter weights and adapter_config.json to `path` (a directory).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when writing fails, or a backend failure.
    fn save(&self, path: &Path) -> Result<()>;
}

/// The element type of LoRA weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraDType {
    /// 32-bit floats (the default).
    #[default]
    F32,
    /// bfloat16, for mixed-precision training.
    Bf16,
}

/// Where and how big LoRA layers are.
///
/// ```
/// use inference_core::LoraConfig;
/// let c = LoraConfig::default();
/// assert_eq!((c.rank, c.alpha, c.scale()), (8, 16.0, 2.0));
/// assert_eq!(c.target_keys, ["q_proj", "v_proj"]);
/// assert!(LoraConfig::default().rank(0).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank of the low-rank update; at least 1. Default 8.
    pub rank: usize,
    /// Scaling numerator: the update is scaled by `alpha / rank`. Finite and > 0. Default 16.
    pub alpha: f32,
    /// Names of the projections to adapt (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`); not empty. Default `q_proj`, `v_proj`.
    pub target_keys: Vec<String>,
    /// Dropout on the adapter's input during training, in [0, 1). Default 0.
    pub dropout: f32,
    /// Element type of the adapter weights. Default f32.
    pub dtype: LoraDType,
    /// Adapt only the last `n` layers; `None` (the default) adapts all of them.
    pub num_layers: Option<usize>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            target_keys: vec!["q_proj".to_owned(), "v_proj".to_owned()],
            dropout: 0.0,
            dtype: LoraDType::F32,
            num_layers: None,
        }
    }
}

impl LoraConfig {
    setters! {
        /// Sets [`rank`](Self::rank).
        rank(rank: usize) = rank;
        /// Sets [`alpha`](Self::alpha).
        alpha(alpha: f32) = alpha;
        /// Replaces [`target_keys`](Self::target_keys).
        target_keys<S: Into<String>>(keys: impl IntoIterator<Item = S>) = keys.into_iter().map(Into::into).collect();
        /// Sets [`dropout`](Self::dropout).
        dropout(dropout: f32) = dropout;
        /// Sets [`dtype`](Self::dtype).
        dtype(dtype: LoraDType) = dtype;
        /// Sets [`num_layers`](Self::num_layers).
        num_layers(n: usize) = Some(n);
    }

    /// The factor applied to the low-rank update: `alpha / rank` (0 when the rank is 0).
    pub fn scale(&self) -> f32 {
        if self.rank == 0 { 0.0 } else { self.alpha / self.rank as f32 }
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for the first field out of range.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid_setting("rank", 0, "must be at least 1"));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::invalid_setting("alpha", self.alpha, "must be a finite number > 0"));
        }
        if self.target_keys.is_empty() {
            return Err(Error::invalid_setting("target_keys", "[]", "must name at least one projection"));
        }
        if let Some(i) = self.target_keys.iter().position(String::is_empty) {
            return Err(Error::invalid_setting(format!("target_keys[{i}]"), "\"\"", "must not be empty"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid_setting("dropout", self.dropout, "must be in [0, 1)"));
        }
        if self.num_layers == Some(0) {
            return Err(Error::invalid_setting("num_layers", 0, "must be at least 1 (leave it unset for all layers)"));
        }
        Ok(())
    }
}
