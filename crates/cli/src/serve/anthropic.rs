// SPDX-License-Identifier: EUPL-1.2
//! Anthropic's Messages API: `POST /v1/messages`, whole or as its server-sent events
//! (`message_start`, `content_block_start`, `content_block_delta`, `content_block_stop`,
//! `message_delta`, `message_stop`), with a system prompt, stop sequences (`stop_reason`
//! `stop_sequence` names the one that ended the answer), the sampling fields and tool use
//! (`anthropic_tools.rs`), as the official `anthropic` SDK sends and reads them. Errors take
//! Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`). Images and documents
//! are refused by name.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use inference_core::{GenerateSettings, Message, Role, ToolCall};
use serde::Deserialize;
use serde_json::{Value, json};

use super::anthropic_tools;
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
    /// A `tool_use` block's call.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    /// A `tool_result` block's answer to a call.
    #[serde(default)]
    tool_use_id: Option<String>,
    #[serde(default)]
    content: Option<Blocks>,
    #[serde(default)]
    is_error: bool,
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

impl Turn {
    /// The turn as messages: an assistant's text with its `tool_use` calls; a user's
    /// `tool_result` blocks as `tool` messages, then its text (if any) as a user message.
    fn messages(&self, i: usize) -> Result<Vec<Message>, ApiError> {
        let what = format!("messages[{i}].content");
        let blocks = match &self.content {
            Blocks::Text(t) => return Ok(vec![Message::new(self.role_of(i)?, t.clone())]),
            Blocks::Blocks(b) => b,
        };
        let role = self.role_of(i)?;
        let (mut text, mut calls, mut out) = (String::new(), Vec::new(), Vec::new());
        for (j, b) in blocks.iter().enumerate() {
            let param = format!("{what}[{j}]");
            let refuse = |why: String| Err(ApiError::invalid(Some(&param), "invalid_value", format!("{param}: {why}")));
            match (b.kind.as_str(), role == Role::ASSISTANT) {
                ("text", _) => text.push_str(b.text.as_deref().unwrap_or_default()),
                ("tool_use", true) => {
                    let (Some(id), Some(name)) = (&b.id, &b.name) else {
                        return refuse("a tool_use block needs an id and a name".into());
                    };
                    let arguments = b.input.clone().unwrap_or_else(|| json!({})).to_string();
                    calls.push(ToolCall { id: id.clone(), name: name.clone(), arguments });
                }
                ("tool_result", false) => {
                    let Some(id) = &b.tool_use_id else {
                        return refuse("a tool_result block needs a tool_use_id".into());
                    };
                    let result = match &b.content {
                        Some(c) => c.text(&format!("{param}.content"))?,
                        None => String::new(),
                    };
                    let result = if b.is_error { format!("Error: {result}") } else { result };
                    out.push(Message::tool(id.clone(), None, result));
                }
                (kind, _) => {
                    return refuse(format!("blocks of type {kind:?} are not supported in a {} turn", self.role));
                }
            }
        }
        if !text.is_empty() || !calls.is_empty() || out.is_empty() {
            out.push(Message::new(role, text).with_tool_calls(calls));
        }
        Ok(out)
    }

    fn role_of(&self, i: usize) -> Result<Role, ApiError> {
        match self.role.as_str() {
            "user" => Ok(Role::USER),
            "assistant" => Ok(Role::ASSISTANT),
            other => {
                let param = format!("messages[{i}].role");
                Err(ApiError::invalid(
                    Some(&param),
                    "invalid_value",
                    format!("{param} = {other:?}: must be \"user\" or \"assistant\""),
                ))
            }
        }
    }
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
    #[serde(default)]
    tool_choice: Option<Value>,
}

impl MessagesRequest {
    /// The conversation: the system prompt first, then the turns (`user` and `assistant` only).
    pub(crate) fn messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(Some("messages"), "invalid_value", "messages must not be empty"));
        }
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            out.push(Message::new(Role::SYSTEM, system.text("system")?));
        }
        for (i, turn) in self.messages.iter().enumerate() {
            out.extend(turn.messages(i)?);
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
        s = anthropic_tools::apply(s, self.tools.as_deref(), self.tool_choice.as_ref())?;
        s.validate().map_err(|e| match e {
            inference_core::Error::InvalidSetting { ref name, .. } if name.starts_with("stop_strings") => {
                ApiError::invalid(Some("stop_sequences"), "invalid_value", e.report())
            }
            other => ApiError::from(other),
        })?;
        Ok(s)
    }
}

/// How an answer ended, in Anthropic's terms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ending<'a> {
    /// The engine's finish reason (`stop` or `length`).
    pub(crate) finish: &'a str,
    /// Whether the answer made tool calls.
    pub(crate) tool_use: bool,
    /// The stop sequence that ended it, if one did.
    pub(crate) stop_sequence: Option<&'a str>,
}

impl Ending<'_> {
    /// Anthropic's `stop_reason`.
    pub(crate) fn stop_reason(&self) -> &'static str {
        match (self.finish, self.tool_use, self.stop_sequence) {
            ("length", _, _) => "max_tokens",
            (_, true, _) => "tool_use",
            (_, _, Some(_)) => "stop_sequence",
            _ => "end_turn",
        }
    }
}

fn usage(input: usize, output: usize, cached: usize) -> Value {
    json!({ "input_tokens": input - cached.min(input), "output_tokens": output, "cache_read_input_tokens": cached })
}

/// A whole `message` of `content` blocks.
pub(crate) fn message(head: &Head, content: Vec<Value>, end: Ending<'_>, tokens: (usize, usize, usize)) -> Value {
    let (input, output, cached) = tokens;
    json!({
        "id": head.id,
        "type": "message",
        "role": "assistant",
        "model": head.model,
        "content": content,
        "stop_reason": end.stop_reason(),
        "stop_sequence": end.stop_sequence,
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

/// The events that close a streamed message (after its blocks' stops).
pub(crate) fn closing(end: Ending<'_>, tokens: (usize, usize, usize)) -> [(&'static str, Value); 2] {
    let (input, output, cached) = tokens;
    [
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": end.stop_reason(), "stop_sequence": end.stop_sequence},
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
        let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        assert_eq!(
            param(&format!("{{{base}, \"max_tokens\": 5, \"stop_sequences\": {}}}", json!(many))).as_deref(),
            Some("stop_sequences")
        );
        assert_eq!(
            param(&format!("{{{base}, \"max_tokens\": 5, \"tools\": [{{\"name\": \"\"}}]}}")).as_deref(),
            Some("tools[0]")
        );
        let image = r#"{"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}"#;
        assert_eq!(param(image).as_deref(), Some("messages[0].content[0]"));
        let role = r#"{"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}"#;
        assert_eq!(param(role).as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn tool_use_and_results_become_calls_and_tool_messages() {
        let r = request(
            r#"{"max_tokens": 5, "messages": [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "3 C"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "down", "is_error": true},
                    {"type": "text", "text": "Thanks"}]}]}"#,
        );
        let m = r.messages().unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!((m[1].content.as_str(), m[1].tool_calls.len()), ("Checking.", 1));
        assert_eq!(
            (m[1].tool_calls[0].id.as_str(), m[1].tool_calls[0].arguments.as_str()),
            ("toolu_1", "{\"city\":\"Oslo\"}")
        );
        assert_eq!(
            (m[2].role.clone(), m[2].tool_call_id.as_deref(), m[2].content.as_str()),
            (Role::TOOL, Some("toolu_1"), "3 C")
        );
        assert_eq!(m[3].content, "Error: down");
        assert_eq!((m[4].role.clone(), m[4].content.as_str()), (Role::USER, "Thanks"));
        let bad = request(
            r#"{"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f"}]}]}"#,
        );
        assert_eq!(bad.messages().unwrap_err().param.as_deref(), Some("messages[0].content[0]"));
    }

    #[test]
    fn answers_and_errors_take_anthropic_s_shapes() {
        let head = Head { id: "msg_1".into(), created: 0, model: "m".into() };
        let end = Ending { finish: "length", tool_use: false, stop_sequence: None };
        let m = message(&head, vec![json!({"type": "text", "text": "Hi"})], end, (10, 3, 4));
        assert_eq!(m["content"], json!([{"type": "text", "text": "Hi"}]));
        assert_eq!(m["stop_reason"], "max_tokens");
        assert_eq!(m["usage"], json!({"input_tokens": 6, "output_tokens": 3, "cache_read_input_tokens": 4}));
        assert_eq!(Ending { finish: "stop", tool_use: false, stop_sequence: None }.stop_reason(), "end_turn");
        let end = Ending { finish: "stop", tool_use: false, stop_sequence: Some("END") };
        let m = message(&head, Vec::new(), end, (1, 1, 0));
        assert_eq!((m["stop_reason"].as_str(), m["stop_sequence"].as_str()), (Some("stop_sequence"), Some("END")));
        assert_eq!(Ending { finish: "stop", tool_use: true, stop_sequence: None }.stop_reason(), "tool_use");
        let e = AnthropicError(ApiError::invalid(Some("x"), "invalid_value", "bad x")).body();
        assert_eq!(e, json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad x"}}));
        assert_eq!(AnthropicError(ApiError::unauthorised()).body()["error"]["type"], "authentication_error");
    }
}
