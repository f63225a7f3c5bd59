// SPDX-License-Identifier: EUPL-1.2
//! The OpenAI request and response shapes: parsing with errors that name the field, the
//! settings a request asks for, and the JSON the server sends back.
//!
//! Unknown fields are ignored, as OpenAI's API does. Sampling fields beyond OpenAI's (`top_k`,
//! `min_p`, `repetition_penalty`, `repetition_context_size`, `ignore_eos`) are accepted as
//! mlx-lm's server accepts them. `temperature` defaults to 0 (greedy), as in mlx-lm's server.

use inference_core::{GenerateSettings, Message, Role};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::error::ApiError;

/// Parses a request body: first as JSON (a syntax error is reported with its line and column),
/// then as `T` (a wrong type names the field's path).
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Value), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, "invalid_json", format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid(None, "invalid_json", "the request body must be a JSON object"));
    }
    let typed = from_value(&value)?;
    Ok((typed, value))
}

/// `T` from an already-parsed object; errors name the field.
pub(crate) fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then(|| path.clone());
        let inner = e.into_inner().to_string();
        let message = match &param {
            Some(p) => format!("invalid field {p}: {inner}"),
            None => format!("invalid request: {inner}"),
        };
        ApiError::invalid(param.as_deref(), "invalid_value", message)
    })
}

/// One string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Sampling {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    repetition_context_size: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    n: Option<u64>,
    ignore_eos: Option<bool>,
    /// `true` (chat, with `top_logprobs`) or the number of alternatives (completions).
    logprobs: Option<Value>,
    top_logprobs: Option<u64>,
}

/// OpenAI's limit on stop sequences.
const MAX_STOP: usize = 4;

/// The most choices (`n`) one request may ask for.
pub(crate) const MAX_CHOICES: u64 = 16;

/// The server's limits on what a request may ask for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_tokens: usize,
    pub(crate) default_max_tokens: usize,
}

impl Sampling {
    /// The settings this request asks for, validated.
    pub(crate) fn settings(&self, limits: Limits) -> Result<GenerateSettings, ApiError> {
        let (field, asked) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => ("max_completion_tokens", Some(n)),
            (None, Some(n)) => ("max_tokens", Some(n)),
            (None, None) => ("max_tokens", None),
        };
        let max_tokens = match asked {
            Some(n) if n > limits.max_tokens as u64 => {
                return Err(ApiError::invalid(
                    Some(field),
                    "invalid_value",
                    format!("{field} = {n} is more than this server's limit of {}", limits.max_tokens),
                ));
            }
            Some(n) => n as usize,
            None => limits.default_max_tokens.min(limits.max_tokens),
        };
        self.choices()?;
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if let Some(v) = value
                && v != 0.0
            {
                return Err(ApiError::invalid(
                    Some(name),
                    "invalid_value",
                    format!("{name} = {v} is not supported; use repetition_penalty"),
                ));
            }
        }
        let mut s = GenerateSettings::new().max_tokens(max_tokens);
        if let Some(k) = self.top_logprobs()? {
            s = s.top_logprobs(k);
        }
        s = with_sampling(s, self.temperature, self.top_p, self.top_k)?;
        if let Some(p) = self.min_p {
            s = s.min_p(p);
        }
        if let Some(r) = self.repetition_penalty {
            s = s.repetition_penalty(r);
        }
        if let Some(n) = self.repetition_context_size {
            s = s.repetition_context_size(usize::try_from(n).unwrap_or(usize::MAX));
        }
        if let Some(seed) = self.seed {
            s = s.seed(seed as u64);
        }
        if let Some(stop) = &self.stop {
            let stop = stop.clone().into_vec();
            if stop.len() > MAX_STOP {
                return Err(ApiError::invalid(
                    Some("stop"),
                    "invalid_value",
                    format!("stop holds {} sequences: at most {MAX_STOP} are allowed", stop.len()),
                ));
            }
            s = s.stop_strings(stop);
        }
        if let Some(ignore) = self.ignore_eos {
            s = s.ignore_eos(ignore);
        }
        s.validate()?;
        Ok(s)
    }
}

impl Sampling {
    /// How many choices the request asks for (`n`, 1 by default).
    pub(crate) fn choices(&self) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_CHOICES).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::invalid(
                Some("n"),
                "invalid_value",
                format!("n = {n}: must be between 1 and {MAX_CHOICES}"),
            )),
        }
    }

    /// How many alternatives each token carries: `logprobs: true` with `top_logprobs` (chat), or
    /// `logprobs: N` (completions); `None` when log-probabilities are not asked for.
    fn top_logprobs(&self) -> Result<Option<usize>, ApiError> {
        let bad = |param: &str, message: String| ApiError::invalid(Some(param), "invalid_value", message);
        let asked = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(self.top_logprobs.unwrap_or(0)),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(k) => Some(k),
                None => return Err(bad("logprobs", format!("logprobs = {n}: must be true, false or a count >= 0"))),
            },
            Some(other) => return Err(bad("logprobs", format!("logprobs = {other}: must be true, false or a count"))),
        };
        if asked.is_none() && self.top_logprobs.is_some_and(|k| k > 0) {
            return Err(bad("top_logprobs", "top_logprobs needs logprobs = true".to_owned()));
        }
        match asked {
            Some(k) if k > inference_core::MAX_TOP_LOGPROBS as u64 => Err(bad(
                if self.top_logprobs.is_some() { "top_logprobs" } else { "logprobs" },
                format!("{k} alternatives: at most {} are allowed", inference_core::MAX_TOP_LOGPROBS),
            )),
            other => Ok(other.map(|k| k as usize)),
        }
    }
}

/// `s` with the sampling fields both APIs share (OpenAI's and Anthropic's), where given.
pub(crate) fn with_sampling(
    mut s: GenerateSettings,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
) -> Result<GenerateSettings, ApiError> {
    if let Some(t) = temperature {
        s = s.temperature(t);
    }
    if let Some(p) = top_p {
        s = s.top_p(p);
    }
    if let Some(k) = top_k {
        let k = usize::try_from(k).map_err(|_| {
            ApiError::invalid(Some("top_k"), "invalid_value", format!("top_k = {k}: must be 0 (off) or more"))
        })?;
        s = s.top_k(k);
    }
    Ok(s)
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: bool,
}

/// The fields both endpoints read besides the sampling ones.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Common {
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    pub(crate) stream_options: Option<StreamOptions>,
}

impl Common {
    pub(crate) fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options.is_some_and(|o| o.include_usage)
    }
}

/// A chat message's content: text, or a list of parts of which only text parts are supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant message's calls (OpenAI's shape; `arguments` text or an object).
    #[serde(default)]
    tool_calls: Option<Vec<inference_core::ToolCall>>,
    /// The call a `tool` message answers.
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// `/v1/chat/completions`'s own fields.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ChatRequest {
    messages: Vec<ChatMessage>,
}

impl ChatRequest {
    /// The conversation, as the engine takes it.
    pub(crate) fn messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(Some("messages"), "invalid_value", "messages must not be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, part) in parts.iter().enumerate() {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    let param = format!("messages[{i}].content[{j}]");
                                    return Err(ApiError::invalid(
                                        Some(&param),
                                        "invalid_value",
                                        format!("{param}: only text parts are supported (got type {kind:?})"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                let role = match m.role.as_str() {
                    // OpenAI's newer name for the system role.
                    "developer" | "system" => Role::SYSTEM,
                    "user" => Role::USER,
                    "assistant" => Role::ASSISTANT,
                    "tool" => Role::TOOL,
                    other => {
                        let param = format!("messages[{i}].role");
                        let why = match other {
                            "" => "must not be empty".to_owned(),
                            "function" => {
                                "\"function\" is OpenAI's retired role: send tool results as role \"tool\"".to_owned()
                            }
                            _ => format!("{other:?} is not a role; use system, developer, user, assistant or tool"),
                        };
                        return Err(ApiError::invalid(Some(&param), "invalid_value", format!("{param} {why}")));
                    }
                };
                if role == Role::TOOL && m.tool_call_id.is_none() {
                    let param = format!("messages[{i}].tool_call_id");
                    return Err(ApiError::invalid(
                        Some(&param),
                        "invalid_value",
                        format!("{param} is required for role tool"),
                    ));
                }
                let mut message = Message::new(role, content).with_tool_calls(m.tool_calls.clone().unwrap_or_default());
                message.tool_call_id.clone_from(&m.tool_call_id);
                message.name.clone_from(&m.name);
                Ok(message)
            })
            .collect()
    }
}

/// `/v1/completions`'s own fields.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct CompletionRequest {
    prompt: OneOrMany,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    best_of: Option<u64>,
}

impl CompletionRequest {
    /// The one prompt; the legacy fields this server does not implement are refused by name
    /// rather than ignored.
    pub(crate) fn prompt(&self) -> Result<String, ApiError> {
        let unsupported =
            |param: &str, why: &str| Err(ApiError::invalid(Some(param), "unsupported_value", format!("{param} {why}")));
        if self.echo == Some(true) {
            return unsupported("echo", "is not supported: the answer holds the completion only");
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return unsupported("suffix", "is not supported (no fill-in-the-middle)");
        }
        if self.best_of.is_some_and(|b| b > 1) {
            return unsupported("best_of", "is not supported; ask for several choices with n");
        }
        match &self.prompt {
            OneOrMany::One(p) => Ok(p.clone()),
            OneOrMany::Many(v) if v.len() == 1 => Ok(v[0].clone()),
            OneOrMany::Many(v) => Err(ApiError::invalid(
                Some("prompt"),
                "invalid_value",
                format!("prompt holds {} strings: only one prompt per request is supported", v.len()),
            )),
        }
    }
}

/// Token counts, as OpenAI reports them: `cached` of the `prompt` tokens came from the prompt cache.
pub(crate) fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached },
    })
}

/// `usage` with OpenAI's `completion_tokens_details` for predictions when speculative decoding
/// guessed tokens: `accepted_prediction_tokens` of the `drafted`, the rest rejected.
pub(crate) fn with_predictions(mut usage: Value, drafted: usize, accepted: usize) -> Value {
    if drafted > 0
        && let Some(u) = usage.as_object_mut()
    {
        u.insert(
            "completion_tokens_details".into(),
            json!({
                "accepted_prediction_tokens": accepted,
                "rejected_prediction_tokens": drafted.saturating_sub(accepted),
            }),
        );
    }
    usage
}

/// What a response's header fields say.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
}

/// One choice of a whole `chat.completion`; `logprobs` as [`super::logprobs::chat`] makes it (or null).
pub(crate) fn chat_choice(index: usize, text: &str, finish: &str, logprobs: Value) -> Value {
    chat_choice_with_calls(index, text, &[], finish, logprobs)
}

/// [`chat_choice`] with the calls the answer made (`content` is null when it wrote nothing else).
pub(crate) fn chat_choice_with_calls(
    index: usize,
    text: &str,
    calls: &[inference_core::ToolCall],
    finish: &str,
    logprobs: Value,
) -> Value {
    let mut message = json!({ "role": "assistant", "content": text });
    if !calls.is_empty() {
        message["tool_calls"] = calls.iter().map(super::tools::call_json).collect();
        if text.trim().is_empty() {
            message["content"] = Value::Null;
        }
    }
    json!({ "index": index, "message": message, "logprobs": logprobs, "finish_reason": finish })
}

/// A whole `chat.completion` of `choices`.
pub(crate) fn chat_completion(head: &Head, choices: Vec<Value>, usage: Value) -> Value {
    response(head, "chat.completion", Value::Array(choices), Some(usage))
}

/// One choice's delta in a `chat.completion.chunk`, with its tokens' `logprobs` (or null).
pub(crate) fn chat_delta(index: usize, delta: Value, finish: Option<&str>, logprobs: Value) -> Value {
    json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
}

/// One `chat.completion.chunk`: deltas, or (with `choices` empty) the usage.
pub(crate) fn chat_chunk(head: &Head, choices: Vec<Value>, usage: Option<Value>) -> Value {
    response(head, "chat.completion.chunk", Value::Array(choices), usage)
}

/// One choice of a `text_completion` (or a piece of it, streaming), with its tokens' `logprobs`
/// (or null).
pub(crate) fn text_choice(index: usize, text: &str, finish: Option<&str>, logprobs: Value) -> Value {
    json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish })
}

/// A whole `text_completion`, or (streaming) one piece of it, or (with `choices` empty) the usage.
pub(crate) fn text_completion(head: &Head, choices: Vec<Value>, usage: Option<Value>) -> Value {
    response(head, "text_completion", Value::Array(choices), usage)
}

/// A response object of type `object`: the head's fields around `choices` and `usage`.
fn response(head: &Head, object: &str, choices: Value, usage: Option<Value>) -> Value {
    json!({
        "id": head.id,
        "object": object,
        "created": head.created,
        "model": head.model,
        "system_fingerprint": null,
        "choices": choices,
        "usage": usage,
    })
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
