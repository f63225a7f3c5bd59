// SPDX-License-Identifier: EUPL-1.2
//! Tool use on Anthropic's Messages API: `tools` (`name`, `description`, `input_schema`) and
//! `tool_choice` (`auto`, `any`, `tool`, `none`, with `disable_parallel_tool_use`) become
//! settings; `tool_use` and `tool_result` blocks in the history become calls and `tool`
//! messages; calls read out of the answer (in the model's own format) become `tool_use` blocks,
//! whole or streamed as Anthropic streams them (a block per call: its start with the id and the
//! name, one `input_json_delta` with the arguments, its stop), with `stop_reason` `tool_use`.

use inference_core::tools::{Piece, ToolCallParser};
use inference_core::{GenerateSettings, ToolCall, ToolCallFormat, ToolChoice};
use serde_json::{Value, json};

use super::error::ApiError;

fn bad(param: &str, message: String) -> ApiError {
    ApiError::invalid(Some(param), "invalid_value", message)
}

/// Anthropic's tool definitions as the function objects templates take.
pub(crate) fn tools(defs: &[Value]) -> Result<Vec<Value>, ApiError> {
    defs.iter()
        .enumerate()
        .map(|(i, d)| {
            let param = format!("tools[{i}]");
            if let Some(kind) = d.get("type").and_then(Value::as_str).filter(|k| *k != "custom") {
                return Err(bad(&param, format!("{param}: server tools (type {kind:?}) are not supported")));
            }
            let name = d.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
            let Some(name) = name else { return Err(bad(&param, format!("{param} needs a non-empty name"))) };
            let schema = d.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"}));
            if !schema.is_object() {
                return Err(bad(&param, format!("{param}.input_schema must be a JSON Schema object")));
            }
            let mut function = json!({"name": name, "parameters": schema});
            if let Some(text) = d.get("description") {
                function["description"] = text.clone();
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

/// `s` with Anthropic's `tools` and `tool_choice`.
pub(crate) fn apply(
    mut s: GenerateSettings,
    defs: Option<&[Value]>,
    choice: Option<&Value>,
) -> Result<GenerateSettings, ApiError> {
    if let Some(defs) = defs {
        s = s.tools(tools(defs)?);
    }
    let Some(choice) = choice else { return Ok(s) };
    let kind = choice.get("type").and_then(Value::as_str);
    let picked = match kind {
        Some("auto") => ToolChoice::Auto,
        Some("none") => ToolChoice::None,
        Some("any") => ToolChoice::Required,
        Some("tool") => match choice.get("name").and_then(Value::as_str) {
            Some(name) => ToolChoice::Function(name.to_owned()),
            None => return Err(bad("tool_choice.name", "tool_choice of type \"tool\" needs a name".to_owned())),
        },
        _ => {
            return Err(bad(
                "tool_choice.type",
                format!("tool_choice = {choice}: type must be \"auto\", \"any\", \"tool\" or \"none\""),
            ));
        }
    };
    if s.tools.is_empty() && matches!(picked, ToolChoice::Required | ToolChoice::Function(_)) {
        return Err(bad("tool_choice", format!("tool_choice = {choice} needs tools")));
    }
    if choice.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
        s = s.parallel_tool_calls(false);
    }
    Ok(s.tool_choice(picked))
}

/// A call as a `tool_use` block (ids are Anthropic's `toolu_` form of the call's).
pub(crate) fn tool_use(call: &ToolCall) -> Value {
    let id = call.id.strip_prefix("call_").map_or_else(|| call.id.clone(), |rest| format!("toolu_{rest}"));
    let input = serde_json::from_str::<Value>(&call.arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": id, "name": call.name, "input": input})
}

/// The content blocks of a whole answer: its text (when there is any, or when there is nothing
/// else), then its calls; and whether it made calls.
pub(crate) fn content(format: Option<ToolCallFormat>, text: &str) -> (Vec<Value>, bool) {
    let (text, calls) = match format {
        Some(f) => inference_core::tools::parse_tool_calls(f, text),
        None => (text.to_owned(), Vec::new()),
    };
    let mut blocks = Vec::new();
    if !text.trim().is_empty() || calls.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    blocks.extend(calls.iter().map(tool_use));
    (blocks, !calls.is_empty())
}

/// A streamed answer's content blocks: text deltas into the open text block, each call a
/// `tool_use` block of its own. Block 0, a text block, is open from the start.
#[derive(Debug)]
pub(crate) struct BlockStream {
    parser: Option<ToolCallParser>,
    /// The open block's index and whether it is a text block; `None` when every block is closed.
    open: Option<(usize, bool)>,
    next: usize,
    calls: usize,
}

type Events = Vec<(&'static str, Value)>;

impl BlockStream {
    /// Reads calls in `format`, or passes text through when `None`.
    pub(crate) fn new(format: Option<ToolCallFormat>) -> Self {
        Self { parser: format.map(ToolCallParser::new), open: Some((0, true)), next: 1, calls: 0 }
    }

    /// The events for the next piece of text.
    pub(crate) fn push(&mut self, text: &str) -> Events {
        let pieces = match &mut self.parser {
            Some(p) => p.push(text),
            None => vec![Piece::Text(text.to_owned())],
        };
        self.events(pieces)
    }

    /// The events of what was held, the last block's stop, and whether calls were made.
    pub(crate) fn finish(&mut self) -> (Events, bool) {
        let pieces = self.parser.take().map(ToolCallParser::finish).unwrap_or_default();
        let mut events = self.events(pieces);
        events.extend(self.close());
        (events, self.calls > 0)
    }

    fn close(&mut self) -> Option<(&'static str, Value)> {
        let (index, _) = self.open.take()?;
        Some(("content_block_stop", json!({"type": "content_block_stop", "index": index})))
    }

    fn start(&mut self, block: Value, text: bool) -> (&'static str, Value) {
        let index = self.next;
        self.next += 1;
        self.open = Some((index, text));
        ("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": block}))
    }

    fn events(&mut self, pieces: Vec<Piece>) -> Events {
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) if t.is_empty() => {}
                Piece::Text(t) => {
                    let index = match self.open {
                        Some((i, true)) => i,
                        _ => {
                            out.extend(self.close());
                            out.push(self.start(json!({"type": "text", "text": ""}), true));
                            self.next - 1
                        }
                    };
                    let delta = json!({"type": "text_delta", "text": t});
                    out.push((
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index, "delta": delta}),
                    ));
                }
                Piece::Call(call) => {
                    self.calls += 1;
                    out.extend(self.close());
                    let mut block = tool_use(&call);
                    block["input"] = json!({});
                    out.push(self.start(block, false));
                    let delta = json!({"type": "input_json_delta", "partial_json": call.arguments});
                    let index = self.next - 1;
                    out.push((
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index, "delta": delta}),
                    ));
                    out.extend(self.close());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_and_choices_become_settings() {
        let defs = [json!({"name": "f", "description": "d", "input_schema": {"type": "object"}})];
        let s = apply(
            GenerateSettings::new(),
            Some(&defs),
            Some(&json!({"type": "any", "disable_parallel_tool_use": true})),
        )
        .unwrap();
        assert_eq!(
            s.tools[0],
            json!({"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}})
        );
        assert_eq!((&s.tool_choice, s.parallel_tool_calls), (&ToolChoice::Required, false));
        let s = apply(GenerateSettings::new(), Some(&defs), Some(&json!({"type": "tool", "name": "f"}))).unwrap();
        assert_eq!(s.tool_choice, ToolChoice::Function("f".into()));
        let param = |defs: &[Value], choice: Value| {
            apply(GenerateSettings::new(), Some(defs), Some(&choice)).unwrap_err().param
        };
        assert_eq!(param(&[json!({"name": ""})], json!({"type": "auto"})).as_deref(), Some("tools[0]"));
        assert_eq!(
            param(&[json!({"type": "bash_20250124", "name": "bash"})], json!({"type": "auto"})).as_deref(),
            Some("tools[0]")
        );
        assert_eq!(param(&defs, json!({"type": "sometimes"})).as_deref(), Some("tool_choice.type"));
        assert_eq!(param(&defs, json!({"type": "tool"})).as_deref(), Some("tool_choice.name"));
        assert_eq!(param(&[], json!({"type": "any"})).as_deref(), Some("tool_choice"));
    }

    #[test]
    fn answers_become_blocks() {
        let answer = "Sure. <tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}</tool_call>";
        let (blocks, calls) = content(Some(ToolCallFormat::Hermes), answer);
        assert!(calls);
        assert_eq!(blocks[0], json!({"type": "text", "text": "Sure. "}));
        assert_eq!((blocks[1]["type"].as_str(), blocks[1]["name"].as_str()), (Some("tool_use"), Some("f")));
        assert_eq!(blocks[1]["input"], json!({"a": 1}));
        assert!(blocks[1]["id"].as_str().unwrap().starts_with("toolu_"));

        let mut s = BlockStream::new(Some(ToolCallFormat::Hermes));
        let mut events = s.push(answer);
        let (rest, made) = s.finish();
        events.extend(rest);
        assert!(made);
        let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop"
            ]
        );
        assert_eq!(events[2].1["content_block"]["name"], "f");
        assert_eq!(events[3].1["delta"], json!({"type": "input_json_delta", "partial_json": "{\"a\":1}"}));
        assert_eq!((events[2].1["index"].as_u64(), events[4].1["index"].as_u64()), (Some(1), Some(1)));
    }
}
