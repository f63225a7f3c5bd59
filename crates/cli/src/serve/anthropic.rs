// SPDX-License-Identifier: EUPL-1.2
//! Anthropic's Messages API: `POST /v1/messages`, whole or as its server-sent events
//! (`message_start`, `content_block_start`, `content_block_delta`, `content_block_stop`,
//! `message_delta`, `message_stop`), with a system prompt, stop sequences and the sampling
//! fields, as the official `anthropic` SDK sends and reads them. Errors take Anthropic's shape
//! (`{"type": "error", "error": {"type", "message"}}`). Text content only for now: tool use and
//! images are refused by name.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use inference_core::{GenerateSettings, Message, Role};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{Head, Limits, with_sampling};
use super::error::ApiError;

/// Text, or a list of content blocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Blocks {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Clone, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Blocks {
    /// The text of the blocks; `what` names them in errors.
    fn text(&self, what: &str) -> Result<String, ApiError> {
        match self {
            Blocks::Text(t) => Ok(t.clone()),
            Blocks::Blocks(blocks) => {
                let mut text = String::new();
                for (j, b) in blocks.iter().enumerate() {
                    match (b.kind.as_str(), &b.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            let param = format!("{what}[{j}]");
                            return Err(ApiError::invalid(
                                Some(&param),
                                "invalid_value",
                                format!("{param}: only text blocks are supported for now (got type {kind:?})"),
                            ));
                        }
                    }
                }
                Ok(text)
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Turn {
    role: String,
    content: Blocks,
}

/// A `POST /v1/messages` body.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct MessagesRequest {
    pub(crate) model: Option<String>,
    max_tokens: Option<u64>,
    messages: Vec<Turn>,
    #[serde(default)]
    system: Option<Blocks>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    #[serde(default)]
    pub(crate) stream: bool,
    #[serde(default)]
    tools: Option<Vec<Value>>,
}

impl MessagesRequest {
    /// The conversation: the system prompt first, then the turns (`user` and `assistant` only).
    pub(crate) fn messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(Some("messages"), "invalid_value", "messages must not be empty"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid(
                Some("tools"),
                "invalid_value",
                "tools are not supported on /v1/messages yet",
            ));
        }
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            out.push(Message::new(Role::SYSTEM, system.text("system")?));
        }
        for (i, turn) in self.messages.iter().enumerate() {
            let role = match turn.role.as_str() {
                "user" => Role::USER,
                "assistant" => Role::ASSISTANT,
                other => {
                    let param = format!("messages[{i}].role");
                    return Err(ApiError::invalid(
                        Some(&param),
                        "invalid_value",
                        format!("{param} = {other:?}: must be \"user\" or \"assistant\""),
                    ));
                }
            };
            out.push(Message::new(role, turn.content.text(&format!("messages[{i}].content"))?));
        }
        Ok(out)
    }

    /// The settings it asks for (`max_tokens` is required, as Anthropic's API has it).
    pub(crate) fn settings(&self, limits: Limits) -> Result<GenerateSettings, ApiError> {
        let max_tokens = match self.max_tokens {
            None => return Err(ApiError::invalid(Some("max_tokens"), "invalid_value", "max_tokens is required")),
            Some(n) if n > limits.max_tokens as u64 => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    "invalid_value",
                    format!("max_tokens = {n} is more than this server's limit of {}", limits.max_tokens),
                ));
            }
            Some(n) => n as usize,
        };
        let mut s =
            with_sampling(GenerateSettings::new().max_tokens(max_tokens), self.temperature, self.top_p, self.top_k)?;
        if let Some(stop) = &self.stop_sequences {
            s = s.stop_strings(stop.iter().cloned());
        }
        s.validate().map_err(|e| match e {
            inference_core::Error::InvalidSetting { ref name, .. } if name.starts_with("stop_strings") => {
                ApiError::invalid(Some("stop_sequences"), "invalid_value", e.report())
            }
            other => ApiError::from(other),
        })?;
        Ok(s)
    }
}

/// Anthropic's `stop_reason` for an engine's finish reason.
pub(crate) fn stop_reason(finish: &str) -> &'static str {
    if finish == "length" { "max_tokens" } else { "end_turn" }
}

fn usage(input: usize, output: usize, cached: usize) -> Value {
    json!({ "input_tokens": input - cached.min(input), "output_tokens": output, "cache_read_input_tokens": cached })
}

/// A whole `message`.
pub(crate) fn message(head: &Head, text: &str, finish: &str, input: usize, output: usize, cached: usize) -> Value {
    json!({
        "id": head.id,
        "type": "message",
        "role": "assistant",
        "model": head.model,
        "content": [{ "type": "text", "text": text }],
        "stop_reason": stop_reason(finish),
        "stop_sequence": null,
        "usage": usage(input, output, cached),
    })
}

/// The events that open a streamed message: `message_start`, then its text block's start.
pub(crate) fn opening(head: &Head) -> [(&'static str, Value); 2] {
    [
        (
            "message_start",
            json!({"type": "message_start", "message": {
                "id": head.id, "type": "message", "role": "assistant", "model": head.model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": usage(0, 0, 0),
            }}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ]
}

/// A piece of the text.
pub(crate) fn delta(text: &str) -> (&'static str, Value) {
    (
        "content_block_delta",
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
    )
}

/// The events that close a streamed message.
pub(crate) fn closing(finish: &str, input: usize, output: usize, cached: usize) -> [(&'static str, Value); 3] {
    [
        ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop_reason(finish), "stop_sequence": null},
                   "usage": usage(input, output, cached)}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]
}

/// An error in Anthropic's shape.
pub(crate) struct AnthropicError(pub(crate) ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

impl AnthropicError {
    pub(crate) fn body(&self) -> Value {
        let kind = match self.0.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        };
        json!({ "type": "error", "error": { "type": kind, "message": self.0.message } })
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        (self.0.status, axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> MessagesRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn requests_become_conversations_and_settings() {
        let limits = Limits { max_tokens: 100, default_max_tokens: 10 };
        let r = request(
            r#"{"model": "m", "max_tokens": 7, "system": [{"type": "text", "text": "Be brief."}],
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                             {"role": "user", "content": "Bye"}], "stop_sequences": ["END"], "temperature": 0.5, "top_k": 3}"#,
        );
        let m = r.messages().unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!((m[0].role.clone(), m[0].content.as_str()), (Role::SYSTEM, "Be brief."));
        assert_eq!((m[2].role.clone(), m[2].content.as_str()), (Role::ASSISTANT, "Hello"));
        let s = r.settings(limits).unwrap();
        assert_eq!(
            (s.max_tokens, s.temperature, s.top_k, s.stop_strings.clone()),
            (7, 0.5, Some(3), vec!["END".to_owned()])
        );
        let param = |json: &str| {
            let r = request(json);
            r.messages().and_then(|_| r.settings(limits)).unwrap_err().param
        };
        let base = r#""messages": [{"role": "user", "content": "Hi"}]"#;
        assert_eq!(param(&format!("{{{base}}}")).as_deref(), Some("max_tokens"));
        assert_eq!(param(&format!("{{{base}, \"max_tokens\": 101}}")).as_deref(), Some("max_tokens"));
        assert_eq!(
            param(&format!("{{{base}, \"max_tokens\": 5, \"stop_sequences\": [\"\"]}}")).as_deref(),
            Some("stop_sequences")
        );
        assert_eq!(
            param(&format!("{{{base}, \"max_tokens\": 5, \"tools\": [{{\"name\": \"f\"}}]}}")).as_deref(),
            Some("tools")
        );
        let image = r#"{"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}"#;
        assert_eq!(param(image).as_deref(), Some("messages[0].content[0]"));
        let role = r#"{"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}"#;
        assert_eq!(param(role).as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn answers_and_errors_take_anthropic_s_shapes() {
        let head = Head { id: "msg_1".into(), created: 0, model: "m".into() };
        let m = message(&head, "Hi", "length", 10, 3, 4);
        assert_eq!(m["content"], json!([{"type": "text", "text": "Hi"}]));
        assert_eq!(m["stop_reason"], "max_tokens");
        assert_eq!(m["usage"], json!({"input_tokens": 6, "output_tokens": 3, "cache_read_input_tokens": 4}));
        assert_eq!(stop_reason("stop"), "end_turn");
        let e = AnthropicError(ApiError::invalid(Some("x"), "invalid_value", "bad x")).body();
        assert_eq!(e, json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad x"}}));
        assert_eq!(AnthropicError(ApiError::unauthorised()).body()["error"]["type"], "authentication_error");
    }
}
