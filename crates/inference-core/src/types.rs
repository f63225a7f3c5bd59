// SPDX-License-Identifier: EUPL-1.2
//! Plain data: tokens, messages, results, metrics and model descriptions.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, ToolCall};

/// One generated (or classified) token.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Token {
    /// The vocabulary id.
    pub id: u32,
    /// The decoded text of this token; concatenating a stream's texts gives the output.
    pub text: String,
    /// The log-probability of this token, when the settings asked for logits or log-probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f32>,
    /// The full distribution at this step (raw logits or log-probabilities, as the
    /// [`LogitsMode`](crate::LogitsMode) asked), one value per vocabulary entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
    /// The token's own text and the most likely tokens at this step, when the settings asked for
    /// [`top_logprobs`](crate::GenerateSettings::top_logprobs) (OpenAI's `logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<TopLogprobs>,
}

/// A token's text on its own and the most likely tokens at its step, most likely first.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TopLogprobs {
    /// The token decoded alone (special tokens included), as OpenAI's `token` field shows it.
    pub text: String,
    /// The alternatives, most likely first (the token itself among them when it is one of them).
    pub top: Vec<TopLogprob>,
}

/// One of the most likely tokens at a step.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The vocabulary id.
    pub id: u32,
    /// The token decoded alone.
    pub text: String,
    /// Its log-probability.
    pub logprob: f32,
}

impl Token {
    /// A token with no log-probability and no logits.
    pub fn new(id: u32, text: impl Into<String>) -> Self {
        Self { id, text: text.into(), logprob: None, logits: None, top_logprobs: None }
    }

    setters! {
        /// This token with its log-probability set.
        with_logprob(logprob: f32) => logprob = Some(logprob);
        /// This token with the full distribution set.
        with_logits(logits: Vec<f32>) => logits = Some(logits);
    }
}

/// The author of a chat [`Message`].
///
/// Any string is accepted, because chat templates know roles beyond the standard three (`tool`,
/// `ipython`); the constants name the standard ones. Serialised as a plain string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Role(Cow<'static, str>);

impl Role {
    /// `system`: instructions that frame the conversation.
    pub const SYSTEM: Role = Role(Cow::Borrowed("system"));
    /// `user`: the person's turns.
    pub const USER: Role = Role(Cow::Borrowed("user"));
    /// `assistant`: the model's turns.
    pub const ASSISTANT: Role = Role(Cow::Borrowed("assistant"));
    /// The result of a tool call.
    pub const TOOL: Role = Role(Cow::Borrowed("tool"));

    /// A role with any name.
    pub fn new(name: impl Into<String>) -> Self {
        Self(Cow::Owned(name.into()))
    }

    /// The role's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Role {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Role {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for Role {
    fn from(name: String) -> Self {
        Self::new(name)
    }
}

impl PartialEq<str> for Role {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Role {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// One turn of a chat; serialised as `{"role":"user","content":"..."}`, with `tool_calls`,
/// `tool_call_id` and `name` only when set (the fields Hugging Face chat templates read).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What they wrote.
    pub content: String,
    /// The calls an assistant message made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The tool that answered (a `tool` message), or the author's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<Role>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None, name: None }
    }

    /// An assistant message that calls tools (its `content` is the text it wrote beside them).
    pub fn with_tool_calls(mut self, calls: impl IntoIterator<Item = ToolCall>) -> Self {
        self.tool_calls = calls.into_iter().collect();
        self
    }

    /// A `tool` message: the result of the call `call_id`, from the tool `name` if given.
    pub fn tool(call_id: impl Into<String>, name: Option<String>, content: impl Into<String>) -> Self {
        Self { tool_call_id: Some(call_id.into()), name, ..Self::new(Role::TOOL, content) }
    }

    /// A [`Role::SYSTEM`] message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::SYSTEM, content)
    }

    /// A [`Role::USER`] message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::USER, content)
    }

    /// A [`Role::ASSISTANT`] message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::ASSISTANT, content)
    }
}

/// The outcome of classifying one prompt: a single prefill, sampled at the last position.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ClassifyResult {
    /// The token sampled at the last position.
    pub token: Token,
    /// The distribution at the last position, present only when the settings asked for logits
    /// or log-probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
}

/// The outcome of one prompt of a batch; a failure of one prompt does not fail the batch.
#[derive(Debug, Default)]
pub struct BatchResult {
    /// The tokens generated before the end (or before the error).
    pub tokens: Vec<Token>,
    /// Why generation for this prompt stopped early, if it did.
    pub error: Option<Error>,
}

impl BatchResult {
    /// The concatenated text of the tokens.
    pub fn text(&self) -> String {
        self.tokens.iter().map(|t| t.text.as_str()).collect()
    }

    /// Whether this prompt completed without error.
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

/// What a model's engine is doing at the moment: requests waiting for room, generations
/// running, and the rows of its batched decode steps. For a server's health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EngineLoad {
    /// Requests waiting for room in the batch.
    pub queued: usize,
    /// Generations being prefilled or decoded.
    pub running: usize,
    /// Rows in the latest decode step (0 when idle).
    pub batch_size: usize,
    /// The most rows the engine decodes at once.
    pub max_batch: usize,
    /// The most rows any decode step has had since the model was loaded.
    pub peak_batch_size: usize,
    /// Decode steps run since the model was loaded.
    pub decode_steps: u64,
    /// Bytes of KV cache one position of one generation takes (0 when unknown).
    pub kv_bytes_per_token: usize,
    /// Bytes of KV cache the engine lets its batch take (`usize::MAX`: no bound).
    pub kv_budget_bytes: usize,
    /// Finished requests' caches kept for requests that start the same way.
    pub prompt_cache_entries: usize,
    /// Bytes those caches take.
    pub prompt_cache_bytes: usize,
    /// The most bytes they may take (0: no prompt cache).
    pub prompt_cache_capacity_bytes: usize,
    /// Requests that started from a cached prefix since the model was loaded.
    pub prompt_cache_hits: u64,
    /// Prompt tokens those requests did not prefill.
    pub prompt_cache_reused_tokens: u64,
    /// Speculative decoding: forward passes that checked guesses, since the model was loaded.
    pub speculative_steps: u64,
    /// Guesses those passes checked.
    pub draft_tokens: u64,
    /// Guesses the model accepted.
    pub accepted_draft_tokens: u64,
    /// Panics the engine caught since the model was loaded; each ended the generations it held
    /// then with an error (a bug to report, not a cause to restart).
    #[serde(default)]
    pub caught_panics: u64,
}

impl EngineLoad {
    /// The counters of work done since `earlier` (a reading of the same engine), gauges as they
    /// are now: what a server reports when it ran work of its own first (its warm-up). The peak
    /// batch size stays the peak since load.
    #[must_use]
    pub fn since(&self, earlier: &EngineLoad) -> EngineLoad {
        EngineLoad {
            decode_steps: self.decode_steps.saturating_sub(earlier.decode_steps),
            prompt_cache_hits: self.prompt_cache_hits.saturating_sub(earlier.prompt_cache_hits),
            prompt_cache_reused_tokens: self
                .prompt_cache_reused_tokens
                .saturating_sub(earlier.prompt_cache_reused_tokens),
            speculative_steps: self.speculative_steps.saturating_sub(earlier.speculative_steps),
            draft_tokens: self.draft_tokens.saturating_sub(earlier.draft_tokens),
            accepted_draft_tokens: self.accepted_draft_tokens.saturating_sub(earlier.accepted_draft_tokens),
            caught_panics: self.caught_panics.saturating_sub(earlier.caught_panics),
            ..*self
        }
    }
}

/// Why a generation ended (OpenAI's `finish_reason`: [`Stop`](Self::Stop) is `"stop"`, the other
/// two are `"length"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended it: an end-of-sequence token or one of the stop strings.
    Stop,
    /// It generated the `max_tokens` it was asked for.
    MaxTokens,
    /// The model's context was full (its `context_length`) before `max_tokens` were generated.
    ContextLength,
}

impl FinishReason {
    /// OpenAI's name for it: `"stop"` or `"length"`.
    pub fn openai(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::MaxTokens | Self::ContextLength => "length",
        }
    }
}

/// Measurements of one generate, chat, classify or batch call.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct GenerateMetrics {
    /// Tokens in the prompt(s), including any served from a prompt cache.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Prompt tokens served from a cache instead of being prefilled.
    pub cached_prompt_tokens: usize,
    /// Time spent on prefill (up to the first sampled token).
    pub prefill_duration: Duration,
    /// Time spent decoding after the first token.
    pub decode_duration: Duration,
    /// Wall time of the whole call.
    pub total_duration: Duration,
    /// Prefilled tokens per second.
    pub prefill_tokens_per_sec: f64,
    /// Generated tokens per second during decode.
    pub decode_tokens_per_sec: f64,
    /// Peak accelerator memory during the call, in bytes (0 when unknown).
    pub peak_memory_bytes: u64,
    /// Accelerator memory in use at the end of the call, in bytes (0 when unknown).
    pub active_memory_bytes: u64,
    /// Which of the settings' `stop_strings` ended the generation (its index), when one did
    /// (Anthropic's `stop_sequence`); `None` when it ended otherwise or the backend does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_string: Option<usize>,
    /// Speculative decoding: tokens guessed (by prompt lookup or a draft model) and checked by
    /// the model; 0 without speculation.
    #[serde(default)]
    pub draft_tokens: usize,
    /// Of [`draft_tokens`](Self::draft_tokens), those the model accepted and that were handed
    /// out: each came without a forward pass of its own.
    #[serde(default)]
    pub accepted_draft_tokens: usize,
    /// Why the generation ended, when the backend says (for a call of several generations, the
    /// last one's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
}

impl GenerateMetrics {
    /// Recomputes the two rates from the counts and durations: prefilled (uncached) prompt tokens
    /// over the prefill time, and generated tokens over the decode time. A zero duration gives a
    /// rate of 0.
    pub fn compute_rates(&mut self) {
        fn rate(tokens: usize, time: Duration) -> f64 {
            let secs = time.as_secs_f64();
            if secs > 0.0 { tokens as f64 / secs } else { 0.0 }
        }
        let prefilled = self.prompt_tokens.saturating_sub(self.cached_prompt_tokens);
        self.prefill_tokens_per_sec = rate(prefilled, self.prefill_duration);
        self.decode_tokens_per_sec = rate(self.generated_tokens, self.decode_duration);
    }

    /// Speculative decoding: the share of guesses the model accepted; `None` when nothing was
    /// guessed.
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.draft_tokens > 0).then(|| self.accepted_draft_tokens as f64 / self.draft_tokens as f64)
    }

    /// Generated tokens per forward pass of the model: 1 for plain decoding, more when
    /// speculative decoding's guesses were accepted (each pass hands out its accepted guesses
    /// and one token of its own); `None` when nothing was generated.
    pub fn tokens_per_forward_pass(&self) -> Option<f64> {
        let passes = self.generated_tokens.saturating_sub(self.accepted_draft_tokens);
        (passes > 0).then(|| self.generated_tokens as f64 / passes as f64)
    }
}

/// A loaded model's shape.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The architecture as config.json names it (`gemma3`, `qwen3`, `llama`).
    pub architecture: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Hidden (model) dimension.
    pub hidden_size: usize,
    /// Bits per quantised weight; `None` when the model is not quantised.
    pub quant_bits: Option<u32>,
    /// Quantisation group size; `None` when the model is not quantised.
    pub quant_group: Option<u32>,
    /// The context length in effect: the one requested at load, else the model's own.
    pub context_length: Option<usize>,
    /// The floating-point type the model computes in (`float32`, `bfloat16`, `float16`), when
    /// the backend says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_dtype: Option<String>,
    /// Why that type: the load setting, or what `auto` chose for the device and the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_dtype_reason: Option<String>,
    /// How the model writes tool calls (from its chat template; [`ToolCallFormat::Json`], the
    /// fallback, when the template shows no known form).
    #[serde(default)]
    pub tool_call_format: crate::ToolCallFormat,
    /// Whether the model's tokenizer carries a chat template of its own (a front end applies it
    /// to a prompt by default then, as `mlx_lm.generate` does; without one, a backend's chat
    /// falls back on a built-in template).
    #[serde(default)]
    pub has_chat_template: bool,
}

impl ModelInfo {
    /// Whether the weights are quantised.
    pub fn is_quantised(&self) -> bool {
        self.quant_bits.is_some()
    }
}

/// Keys (and, when the backend captures them, queries) of every layer after one prefill.
///
/// Each `[layer][head]` vector is flat: `seq_len * head_dim` values, position-major. Keys are per
/// key-value head (`num_heads`); queries, when present, per query head (`num_query_heads`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AttentionSnapshot {
    /// Layers captured.
    pub num_layers: usize,
    /// Key-value heads per layer.
    pub num_heads: usize,
    /// Prompt positions captured.
    pub seq_len: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Query heads per layer; 0 when queries were not captured.
    #[serde(default)]
    pub num_query_heads: usize,
    /// Keys as `[layer][head]` → `seq_len * head_dim` values.
    pub keys: Vec<Vec<Vec<f32>>>,
    /// Queries as `[layer][head]` → `seq_len * head_dim` values; empty when not captured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queries: Vec<Vec<Vec<f32>>>,
    /// The model's architecture.
    pub architecture: String,
}

impl AttentionSnapshot {
    /// Whether queries were captured.
    pub fn has_queries(&self) -> bool {
        !self.queries.is_empty()
    }

    /// The keys of one head of one layer (`seq_len * head_dim` values).
    pub fn key(&self, layer: usize, head: usize) -> Option<&[f32]> {
        self.keys.get(layer)?.get(head).map(Vec::as_slice)
    }

    /// The queries of one head of one layer (`seq_len * head_dim` values).
    pub fn query(&self, layer: usize, head: usize) -> Option<&[f32]> {
        self.queries.get(layer)?.get(head).map(Vec::as_slice)
    }
}

/// A model directory found by [`discover`](crate::discover()).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiscoveredModel {
    /// The directory, absolute.
    pub path: PathBuf,
    /// The architecture from config.json, or `None` when config.json names none or is not valid
    /// JSON.
    pub model_type: Option<String>,
    /// Bits per quantised weight, when config.json declares quantisation.
    pub quant_bits: Option<u32>,
    /// Quantisation group size, when config.json declares it.
    pub quant_group: Option<u32>,
    /// Number of `*.safetensors` files in the directory.
    pub num_files: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_serde_round_trip() {
        let m = Message::user("hello");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"role":"user","content":"hello"}"#);
        let back: Message = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.role, Role::USER);
        let tool: Message = serde_json::from_str(r#"{"role":"tool","content":"42"}"#).unwrap();
        assert_eq!(tool.role, "tool");
        assert_eq!(tool.role.as_str(), "tool");
        assert_eq!(tool.role.to_string(), "tool");
    }

    #[test]
    fn message_constructors_use_standard_roles() {
        assert_eq!(Message::system("s").role, "system");
        assert_eq!(Message::assistant("a").role, Role::ASSISTANT);
        assert_eq!(Message::new("user", "x"), Message::user("x"));
        assert!(serde_json::from_str::<Message>(r#"{"role":"user"}"#).is_err());
    }

    #[test]
    fn token_serde_skips_absent_fields() {
        let t = Token::new(7, "hi");
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"id":7,"text":"hi"}"#);
        let t = t.with_logprob(-0.5).with_logits(vec![1.0]);
        let back: Token = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn attention_snapshot_serde_is_snake_case_and_queries_optional() {
        let mut s = AttentionSnapshot {
            num_layers: 1,
            num_heads: 1,
            seq_len: 2,
            head_dim: 1,
            num_query_heads: 0,
            keys: vec![vec![vec![0.5, 1.5]]],
            queries: Vec::new(),
            architecture: "gemma3".into(),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"num_layers":1,"num_heads":1,"seq_len":2,"head_dim":1,"num_query_heads":0,"keys":[[[0.5,1.5]]],"architecture":"gemma3"}"#
        );
        assert!(!s.has_queries());
        assert_eq!(s.key(0, 0), Some(&[0.5, 1.5][..]));
        assert_eq!(s.key(1, 0), None);
        assert_eq!(s.query(0, 0), None);
        s.queries = vec![vec![vec![2.0, 3.0]]];
        s.num_query_heads = 1;
        assert!(s.has_queries());
        let back: AttentionSnapshot = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn metrics_rates() {
        let mut m = GenerateMetrics {
            prompt_tokens: 12,
            cached_prompt_tokens: 2,
            generated_tokens: 30,
            prefill_duration: Duration::from_millis(500),
            decode_duration: Duration::from_secs(3),
            ..Default::default()
        };
        m.compute_rates();
        assert_eq!(m.prefill_tokens_per_sec, 20.0);
        assert_eq!(m.decode_tokens_per_sec, 10.0);
        let mut zero = GenerateMetrics { generated_tokens: 5, ..Default::default() };
        zero.compute_rates();
        assert_eq!(zero.decode_tokens_per_sec, 0.0);
        assert_eq!((zero.acceptance_rate(), zero.tokens_per_forward_pass()), (None, Some(1.0)));
        // 12 tokens, 8 of 10 guesses accepted: 4 forward passes.
        let spec = GenerateMetrics { generated_tokens: 12, draft_tokens: 10, accepted_draft_tokens: 8, ..m };
        assert_eq!((spec.acceptance_rate(), spec.tokens_per_forward_pass()), (Some(0.8), Some(3.0)));
        assert_eq!(GenerateMetrics::default().tokens_per_forward_pass(), None);
    }

    #[test]
    fn batch_result_text() {
        let r = BatchResult { tokens: vec![Token::new(1, "a"), Token::new(2, "b")], error: None };
        assert_eq!(r.text(), "ab");
        assert!(r.is_ok());
        let r = BatchResult { tokens: Vec::new(), error: Some(Error::Cancelled) };
        assert!(!r.is_ok());
    }

    #[test]
    fn model_info_quantised() {
        assert!(!ModelInfo::default().is_quantised());
        let q = ModelInfo { quant_bits: Some(4), quant_group: Some(64), ..Default::default() };
        assert!(q.is_quantised());
    }
}
