// SPDX-License-Identifier: EUPL-1.2
//! Tool calling and structured output on OpenAI's API: `tools`, `tool_choice`,
//! `parallel_tool_calls` and `response_format` become settings; calls read out of an answer
//! (inference-core's [`ToolCallParser`], in the model's own format) become `tool_calls`, whole
//! or streamed as OpenAI streams them (each call one delta with its index, id, name and
//! arguments).

use inference_core::tools::{Piece, ToolCallParser};
use inference_core::{Constraint, GenerateSettings, ToolCall, ToolCallFormat, ToolChoice};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;

/// The request fields this module reads (both endpoints; tools only matter to chat).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ToolFields {
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<Value>,
}

fn bad(param: &str, message: String) -> ApiError {
    ApiError::invalid(Some(param), "invalid_value", message)
}

impl ToolFields {
    /// `s` with the request's tools, tool choice and constraint; errors name the field.
    pub(crate) fn apply(&self, mut s: GenerateSettings) -> Result<GenerateSettings, ApiError> {
        if let Some(tools) = &self.tools {
            inference_core::tools::validate_tools(tools).map_err(|e| bad("tools", e.to_string()))?;
            s = s.tools(tools.iter().cloned());
        }
        if let Some(choice) = &self.tool_choice {
            let choice = tool_choice(choice, s.tools.is_empty())?;
            s = s.tool_choice(choice);
        }
        if let Some(parallel) = self.parallel_tool_calls {
            s = s.parallel_tool_calls(parallel);
        }
        if let Some(format) = &self.response_format
            && let Some(c) = response_format(format)?
        {
            if matches!(s.tool_choice, ToolChoice::Required | ToolChoice::Function(_)) && !s.tools.is_empty() {
                return Err(bad(
                    "response_format",
                    "response_format cannot be combined with a tool_choice that forces a call".to_owned(),
                ));
            }
            s = s.constraint(c);
        }
        Ok(s)
    }
}

/// The format to read calls in (the model's), when the settings offer tools the model may call
/// (OpenAI's and Anthropic's endpoints alike).
pub(crate) fn call_format(settings: &GenerateSettings, model: ToolCallFormat) -> Option<ToolCallFormat> {
    (!settings.tools.is_empty() && settings.tool_choice != ToolChoice::None).then_some(model)
}

/// OpenAI's `tool_choice`: `"none"`, `"auto"`, `"required"`, or
/// `{"type": "function", "function": {"name": ...}}`.
fn tool_choice(v: &Value, no_tools: bool) -> Result<ToolChoice, ApiError> {
    let choice = match v {
        Value::String(s) if s == "none" => ToolChoice::None,
        Value::String(s) if s == "auto" => ToolChoice::Auto,
        Value::String(s) if s == "required" => ToolChoice::Required,
        Value::Object(_) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                ToolChoice::Function(name.to_owned())
            }
            _ => {
                return Err(bad(
                    "tool_choice",
                    format!(
                        "tool_choice = {v}: an object must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ),
                ));
            }
        },
        other => {
            return Err(bad(
                "tool_choice",
                format!("tool_choice = {other}: must be \"none\", \"auto\", \"required\" or a function"),
            ));
        }
    };
    if no_tools && matches!(choice, ToolChoice::Required | ToolChoice::Function(_)) {
        return Err(bad("tool_choice", format!("tool_choice = {v} needs tools")));
    }
    Ok(choice)
}

/// OpenAI's `response_format`: `text` (no constraint), `json_object`, or `json_schema` with
/// `json_schema.schema`.
pub(crate) fn response_format(v: &Value) -> Result<Option<Constraint>, ApiError> {
    let kind = v.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => match v.pointer("/json_schema/schema") {
            Some(schema @ (Value::Object(_) | Value::Bool(_))) => Ok(Some(Constraint::JsonSchema(schema.clone()))),
            Some(other) => Err(bad(
                "response_format.json_schema.schema",
                format!("response_format.json_schema.schema = {other}: must be a JSON Schema object"),
            )),
            // A `json_schema` without a schema (some clients send only a name): any JSON object.
            None if v.get("json_schema").is_some_and(Value::is_object) => Ok(Some(Constraint::JsonObject)),
            None => Err(bad("response_format.json_schema", "response_format.json_schema is missing".to_owned())),
        },
        _ => Err(bad(
            "response_format.type",
            format!("response_format = {v}: type must be \"text\", \"json_object\" or \"json_schema\""),
        )),
    }
}

/// A call as OpenAI answers it (`arguments` is JSON text).
pub(crate) fn call_json(call: &ToolCall) -> Value {
    json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

/// A streamed call: the whole call in one delta, with its index in the answer.
pub(crate) fn call_delta(index: usize, call: &ToolCall) -> Value {
    let mut v = call_json(call);
    v["index"] = json!(index);
    json!({ "tool_calls": [v] })
}

/// The finish reason of an answer that made calls (OpenAI's `tool_calls`), else the engine's.
pub(crate) fn finish_reason(finish: &'static str, calls: usize) -> &'static str {
    if calls > 0 && finish == "stop" { "tool_calls" } else { finish }
}

/// One choice's reading of its streamed text: the deltas to send for each piece of text.
#[derive(Debug)]
pub(crate) struct CallStream {
    parser: Option<ToolCallParser>,
    calls: usize,
}

impl CallStream {
    /// Reads calls in `format`, or passes text through when `None`.
    pub(crate) fn new(format: Option<ToolCallFormat>) -> Self {
        Self { parser: format.map(ToolCallParser::new), calls: 0 }
    }

    /// The deltas for the next piece of text.
    pub(crate) fn push(&mut self, text: &str) -> Vec<Value> {
        match &mut self.parser {
            Some(p) => {
                let pieces = p.push(text);
                self.deltas(pieces)
            }
            None => vec![json!({ "content": text })],
        }
    }

    /// The deltas of what was held at the end, and the number of calls made.
    pub(crate) fn finish(&mut self) -> (Vec<Value>, usize) {
        let pieces = self.parser.take().map(ToolCallParser::finish).unwrap_or_default();
        (self.deltas(pieces), self.calls)
    }

    fn deltas(&mut self, pieces: Vec<Piece>) -> Vec<Value> {
        pieces
            .into_iter()
            .map(|p| match p {
                Piece::Text(t) => json!({ "content": t }),
                Piece::Call(c) => {
                    self.calls += 1;
                    call_delta(self.calls - 1, &c)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> ToolFields {
        serde_json::from_str(json).unwrap()
    }

    const TOOL: &str = r#"{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}"#;

    #[test]
    fn fields_become_settings() {
        let f = fields(&format!(r#"{{"tools": [{TOOL}], "tool_choice": "required", "parallel_tool_calls": false}}"#));
        let s = f.apply(GenerateSettings::new()).unwrap();
        assert_eq!((s.tools.len(), &s.tool_choice, s.parallel_tool_calls), (1, &ToolChoice::Required, false));
        let f = fields(&format!(
            r#"{{"tools": [{TOOL}], "tool_choice": {{"type": "function", "function": {{"name": "f"}}}}}}"#
        ));
        assert_eq!(f.apply(GenerateSettings::new()).unwrap().tool_choice, ToolChoice::Function("f".into()));
        let f = fields(
            r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}}}"#,
        );
        let s = f.apply(GenerateSettings::new()).unwrap();
        assert_eq!(s.constraint, Some(Constraint::JsonSchema(json!({"type": "object"}))));
        let f = fields(r#"{"response_format": {"type": "json_object"}}"#);
        assert_eq!(f.apply(GenerateSettings::new()).unwrap().constraint, Some(Constraint::JsonObject));
        assert_eq!(
            fields(r#"{"response_format": {"type": "text"}}"#).apply(GenerateSettings::new()).unwrap().constraint,
            None
        );
        let none = fields(&format!(r#"{{"tools": [{TOOL}], "tool_choice": "none"}}"#));
        let s = none.apply(GenerateSettings::new()).unwrap();
        assert_eq!(call_format(&s, ToolCallFormat::Hermes), None);
    }

    #[test]
    fn bad_fields_are_named() {
        let param = |json: &str| fields(json).apply(GenerateSettings::new()).unwrap_err().param;
        assert_eq!(param(r#"{"tools": [{"type": "x"}]}"#).as_deref(), Some("tools"));
        assert_eq!(param(r#"{"tool_choice": "maybe"}"#).as_deref(), Some("tool_choice"));
        assert_eq!(param(r#"{"tool_choice": "required"}"#).as_deref(), Some("tool_choice"));
        assert_eq!(param(r#"{"response_format": {"type": "yaml"}}"#).as_deref(), Some("response_format.type"));
        assert_eq!(
            param(r#"{"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}"#).as_deref(),
            Some("response_format.json_schema.schema")
        );
    }

    #[test]
    fn calls_stream_as_deltas_with_indices() {
        let mut s = CallStream::new(Some(ToolCallFormat::Hermes));
        let mut deltas = s.push("Hi <tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}</tool_call>");
        let (rest, calls) = s.finish();
        deltas.extend(rest);
        assert_eq!(calls, 1);
        assert_eq!(deltas[0], json!({"content": "Hi "}));
        let call = &deltas[1]["tool_calls"][0];
        assert_eq!((call["index"].as_u64(), call["function"]["name"].as_str()), (Some(0), Some("f")));
        assert_eq!(call["function"]["arguments"], "{\"a\":1}");
        assert_eq!(finish_reason("stop", calls), "tool_calls");
        assert_eq!(finish_reason("length", calls), "length");
        let mut plain = CallStream::new(None);
        assert_eq!(plain.push("<tool_call>"), [json!({"content": "<tool_call>"})]);
    }
}
