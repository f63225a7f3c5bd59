// SPDX-License-Identifier: EUPL-1.2
//! Tool calling: the tools a chat may call, the calls a model writes, and how they are read
//! out of its text.
//!
//! Tools go to the model's own chat template as `tools` (OpenAI's function objects, which
//! Hugging Face templates take as they are). A model answers with calls in its family's
//! written form ([`ToolCallFormat`]); [`ToolCallParser`] reads them out of the streamed text,
//! holding back only what might still become a call. A template that knows no tools gets
//! [`fallback_prompt`] as a system message and answers in the Hermes form.
//! [`ToolChoice::Required`] and [`ToolChoice::Function`] constrain decoding to
//! [`call_grammar`], so the call is always well formed.

use std::fmt::Write as _;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value, json};

use crate::{Constraint, Error, Message, Result, Role};

/// One call a model made: `{"id", "type": "function", "function": {"name", "arguments"}}` in
/// OpenAI's shape. `arguments` is JSON text; a template sees it parsed (as Hugging Face
/// templates expect a dict).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ToolCall {
    /// The call's id, which the `tool` message answering it names.
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments, JSON text (an object, as the model wrote it).
    pub arguments: String,
}

impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let args =
            serde_json::from_str::<Value>(&self.arguments).unwrap_or_else(|_| Value::String(self.arguments.clone()));
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}).serialize(s)
    }
}

impl<'de> Deserialize<'de> for ToolCall {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Function {
            name: String,
            #[serde(default)]
            arguments: Option<Value>,
        }
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            id: String,
            function: Function,
        }
        let w = Wire::deserialize(d)?;
        let arguments = match w.function.arguments {
            Some(Value::String(s)) => s,
            Some(Value::Null) | None => "{}".to_owned(),
            Some(v) => v.to_string(),
        };
        Ok(ToolCall { id: w.id, name: w.function.name, arguments })
    }
}

/// Which tools the model may call ([`GenerateSettings::tool_choice`](crate::GenerateSettings::tool_choice)).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides (the default).
    #[default]
    Auto,
    /// No tool: the tools are not shown to the model.
    None,
    /// At least one call, enforced by constrained decoding.
    Required,
    /// A call of this function, enforced by constrained decoding.
    Function(String),
}

/// How a model family writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolCallFormat {
    /// Hermes, Qwen 2.5/3, SmolLM3: `<tool_call>{"name": .., "arguments": {..}}</tool_call>`.
    Hermes,
    /// Llama 3.1+: one JSON object `{"name": .., "parameters": {..}}` as the whole answer,
    /// optionally after `<|python_tag|>`; several separated by `;`.
    Llama3,
    /// Mistral: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}`, or
    /// `name[ARGS]{..}` per call.
    Mistral,
    /// The fallback, for templates without a known form (and those without tools, which get
    /// [`fallback_prompt`]): Hermes tags anywhere, or an answer that is only a JSON call
    /// object (or an array of them, or one in a ```json fence).
    #[default]
    Json,
}

impl ToolCallFormat {
    /// The form a chat template's source asks for, by the markers it writes.
    pub fn detect(template: &str) -> Self {
        if template.contains("<tool_call>") {
            Self::Hermes
        } else if template.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if template.contains("<|python_tag|>") || template.contains("ipython") {
            Self::Llama3
        } else {
            Self::Json
        }
    }

    /// The lower-case name: `hermes`, `llama3`, `mistral` or `json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3 => "llama3",
            Self::Mistral => "mistral",
            Self::Json => "json",
        }
    }

    /// The key a call object holds its arguments under.
    fn arguments_key(self) -> &'static str {
        if self == Self::Llama3 { "parameters" } else { "arguments" }
    }
}

/// Whether a chat template renders tools itself (its source uses the `tools` variable); one
/// that does not gets [`fallback_messages`].
pub fn template_supports_tools(template: &str) -> bool {
    template.contains("tools")
}

/// The form a model with this chat template writes calls in: [`ToolCallFormat::detect`] for a
/// template that supports tools, else the fallback [`ToolCallFormat::Json`].
pub fn template_format(template: &str) -> ToolCallFormat {
    if template_supports_tools(template) { ToolCallFormat::detect(template) } else { ToolCallFormat::Json }
}

/// What a tool definition must look like: `{"type": "function", "function": {"name": ..}}`.
///
/// # Errors
/// [`Error::InvalidSetting`] naming `tools[i]` and what is missing.
pub fn validate_tools(tools: &[Value]) -> Result<()> {
    for (i, t) in tools.iter().enumerate() {
        let bad = |why: &str| Error::invalid_setting(format!("tools[{i}]"), short(t), why.to_owned());
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("must have \"type\": \"function\""));
        }
        match t.pointer("/function/name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => {}
            _ => return Err(bad("must have a non-empty function.name")),
        }
        if let Some(p) = t.pointer("/function/parameters")
            && !p.is_object()
        {
            return Err(bad("function.parameters must be a JSON Schema object"));
        }
    }
    Ok(())
}

fn tool_name(t: &Value) -> &str {
    t.pointer("/function/name").and_then(Value::as_str).unwrap_or_default()
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 { format!("{}...", &s[..s.floor_char_boundary(60)]) } else { s }
}

/// The system text that tells a model whose template knows no tools how to call them (the
/// [`ToolCallFormat::Json`] fallback): the definitions, then the Hermes form to answer in.
pub fn fallback_prompt(tools: &[Value]) -> String {
    let mut s = String::from(
        "You may call one or more functions to help with the user's request. The functions are:\n<tools>\n",
    );
    for t in tools {
        let f = t.get("function").unwrap_or(t);
        let _ = writeln!(s, "{f}");
    }
    s.push_str(
        "</tools>\nTo call a function, answer with one JSON object per call, each inside <tool_call></tool_call> \
         tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// `messages` for a template that knows no tools: [`fallback_prompt`] in the system message
/// (the caller's first, if any), earlier calls written into their assistant messages in the
/// Hermes form, and tool results as user messages in `<tool_response>` tags (templates such as
/// Gemma's refuse roles other than user and assistant).
pub fn fallback_messages(messages: &[Message], offered: &[Value]) -> Vec<Message> {
    let mut out: Vec<Message> = messages
        .iter()
        .map(|m| {
            if m.role == Role::TOOL {
                let text = format!("<tool_response>\n{}\n</tool_response>", m.content);
                return Message::user(text);
            }
            let mut text = m.content.clone();
            for call in &m.tool_calls {
                let args =
                    serde_json::from_str::<Value>(&call.arguments).unwrap_or(Value::String(call.arguments.clone()));
                let body = format!("{{\"name\": {}, \"arguments\": {args}}}", Value::String(call.name.clone()));
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format!("<tool_call>\n{body}\n</tool_call>"));
            }
            Message::new(m.role.clone(), text)
        })
        .collect();
    if !offered.is_empty() {
        let prompt = fallback_prompt(offered);
        match out.first_mut() {
            Some(first) if first.role == Role::SYSTEM => first.content = format!("{}\n\n{prompt}", first.content),
            _ => out.insert(0, Message::system(prompt)),
        }
    }
    out
}

/// The constraint that makes a model call a tool in `format`: one call (several when
/// `parallel`) of any of `tools`, or of `only` when given, with arguments valid against the
/// tool's `parameters`.
///
/// # Errors
/// [`Error::InvalidSetting`] when `tools` is empty or `only` names none of them.
pub fn call_grammar(format: ToolCallFormat, tools: &[Value], only: Option<&str>, parallel: bool) -> Result<Constraint> {
    validate_tools(tools)?;
    let chosen: Vec<&Value> = tools.iter().filter(|t| only.is_none_or(|n| tool_name(t) == n)).collect();
    if chosen.is_empty() {
        return Err(match only {
            Some(n) => Error::invalid_setting("tool_choice", n, "names no tool of the request"),
            None => Error::invalid_setting("tool_choice", "required", "needs at least one tool"),
        });
    }
    let key = format.arguments_key();
    let calls: Vec<Value> = chosen
        .iter()
        .map(|t| {
            let params = t.pointer("/function/parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
            json!({
                "type": "object",
                "properties": {"name": {"const": tool_name(t)}, key: params},
                "required": ["name", key],
                "additionalProperties": false
            })
        })
        .collect();
    let call = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
    // llguidance's layout: `json.dumps`'s separators and no other white space between values.
    let top = |mut v: Value| {
        v["x-guidance"] = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        v
    };
    let repeat = if parallel { "+" } else { "" };
    let grammar = match format {
        ToolCallFormat::Hermes | ToolCallFormat::Json => {
            let call = top(call);
            format!("start: tc{repeat}\ntc: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {call}\n")
        }
        ToolCallFormat::Llama3 if parallel => format!("start: call (\"; \" call)*\ncall: %json {}\n", top(call)),
        ToolCallFormat::Llama3 => format!("start: call\ncall: %json {}\n", top(call)),
        ToolCallFormat::Mistral => {
            let items = if parallel {
                json!({"type": "array", "items": call, "minItems": 1})
            } else {
                json!({"type": "array", "items": call, "minItems": 1, "maxItems": 1})
            };
            format!("start: calls\ncalls: %json {}\n", top(items))
        }
    };
    Ok(Constraint::Lark(grammar))
}

/// A piece of a model's answer: text for the user, or a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text, in order.
    Text(String),
    /// A call, whole.
    Call(ToolCall),
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARK: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but white space seen yet (a leading JSON call is possible).
    Start,
    /// Text; a tag may still open.
    Text,
    /// Inside `<tool_call>`.
    InTag,
    /// Everything from here to the end is calls (after `[TOOL_CALLS]`, `<|python_tag|>` or
    /// a leading `{`).
    Rest,
}

/// Reads tool calls out of streamed text ([`push`](Self::push) each delta, then
/// [`finish`](Self::finish)). What does not parse as a call is handed back as text, so
/// nothing the model wrote is lost.
#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolCallFormat,
    state: State,
    buf: String,
    ids: IdMaker,
}

impl ToolCallParser {
    /// A parser for `format`.
    pub fn new(format: ToolCallFormat) -> Self {
        Self { format, state: State::Start, buf: String::new(), ids: IdMaker::new() }
    }

    /// Whether a leading JSON object (the whole answer) may be a call in this format.
    fn leading_json(&self) -> bool {
        matches!(self.format, ToolCallFormat::Llama3 | ToolCallFormat::Json | ToolCallFormat::Mistral)
    }

    /// Takes the next delta of text; returns what is settled.
    pub fn push(&mut self, delta: &str) -> Vec<Piece> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let t = self.buf.trim_start();
                    if t.is_empty() {
                        return out;
                    }
                    let rest = [PYTHON_TAG, MISTRAL_MARK, "```json", "{", "["];
                    if self.leading_json() && rest.iter().any(|m| t.starts_with(m)) {
                        self.state = State::Rest;
                        return out;
                    }
                    if self.leading_json() && rest.iter().any(|m| m.starts_with(t)) {
                        return out; // `<|pyth` or "```": wait for more
                    }
                    self.state = State::Text;
                }
                State::Text => {
                    let open = if self.format == ToolCallFormat::Mistral { MISTRAL_MARK } else { HERMES_OPEN };
                    if let Some(at) = self.buf.find(open) {
                        push_text(&mut out, self.buf[..at].to_owned());
                        if self.format == ToolCallFormat::Mistral {
                            self.buf.drain(..at);
                            self.state = State::Rest;
                            return out;
                        }
                        self.buf.drain(..at + open.len());
                        self.state = State::InTag;
                        continue;
                    }
                    let keep = partial_suffix(&self.buf, open);
                    let settled = self.buf.len() - keep;
                    push_text(&mut out, self.buf.drain(..settled).collect());
                    return out;
                }
                State::InTag => {
                    let Some(at) = self.buf.find(HERMES_CLOSE) else { return out };
                    let body: String = self.buf.drain(..at + HERMES_CLOSE.len()).collect();
                    let body = &body[..at];
                    match parse_calls(body, self.format) {
                        Some(calls) => out.extend(calls.into_iter().map(|c| Piece::Call(self.ids.call(c)))),
                        None => push_text(&mut out, format!("{HERMES_OPEN}{body}{HERMES_CLOSE}")),
                    }
                    self.state = State::Text;
                }
                State::Rest => return out,
            }
        }
    }

    /// The end of the answer: whatever is held is settled (calls, or text when it does not
    /// parse).
    pub fn finish(mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let buf = std::mem::take(&mut self.buf);
        match self.state {
            State::Start | State::Text => push_text(&mut out, buf),
            State::InTag => match parse_calls(&buf, self.format) {
                // A call the model ended without its closing tag.
                Some(calls) => out.extend(calls.into_iter().map(|c| Piece::Call(self.ids.call(c)))),
                None => push_text(&mut out, format!("{HERMES_OPEN}{buf}")),
            },
            State::Rest => {
                let body = buf.trim_start();
                let body = [PYTHON_TAG, MISTRAL_MARK].iter().find_map(|m| body.strip_prefix(m)).unwrap_or(body);
                match parse_calls(body, self.format) {
                    Some(calls) => out.extend(calls.into_iter().map(|c| Piece::Call(self.ids.call(c)))),
                    None => push_text(&mut out, buf),
                }
            }
        }
        out
    }
}

/// Splits a whole answer into its text and its calls (what streaming [`ToolCallParser`]
/// gives, joined).
pub fn parse_tool_calls(format: ToolCallFormat, text: &str) -> (String, Vec<ToolCall>) {
    let mut p = ToolCallParser::new(format);
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    let (mut content, mut calls) = (String::new(), Vec::new());
    for piece in pieces {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    (content, calls)
}

fn push_text(out: &mut Vec<Piece>, text: String) {
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
}

/// The length of the longest suffix of `s` that is a proper prefix of `tag` (text that may
/// still become the tag).
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

/// A call before it has an id: name and arguments text.
type RawCall = (String, String);

/// The calls in `body`: one JSON call object, an array of them, several separated by `;` or
/// new lines, a ```json fence around any of these, or Mistral's `name[ARGS]{..}`.
fn parse_calls(body: &str, format: ToolCallFormat) -> Option<Vec<RawCall>> {
    let body = body.trim();
    let body = body
        .strip_prefix("```json")
        .or_else(|| body.strip_prefix("```"))
        .map_or(body, |b| b.trim_end().strip_suffix("```").unwrap_or(b));
    let body = body.trim();
    if body.is_empty() {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return calls_of(v);
    }
    if format == ToolCallFormat::Mistral && body.contains("[ARGS]") {
        return mistral_args(body);
    }
    // Several objects in a row (`;` or new lines between them).
    let mut calls = Vec::new();
    for v in serde_json::Deserializer::from_str(&body.replace(';', "\n")).into_iter::<Value>() {
        calls.extend(calls_of(v.ok()?)?);
    }
    (!calls.is_empty()).then_some(calls)
}

fn calls_of(v: Value) -> Option<Vec<RawCall>> {
    match v {
        Value::Array(items) if !items.is_empty() => items.into_iter().map(call_of).collect(),
        Value::Object(o) => Some(vec![call_of(Value::Object(o))?]),
        _ => None,
    }
}

fn call_of(v: Value) -> Option<RawCall> {
    let Value::Object(mut o) = v else { return None };
    if let Some(Value::Object(f)) = o.remove("function") {
        o = f;
    }
    let Some(Value::String(name)) = o.remove("name") else { return None };
    let args = o.remove("arguments").or_else(|| o.remove("parameters")).unwrap_or(Value::Object(Map::new()));
    let args = match args {
        Value::String(s) if serde_json::from_str::<Value>(&s).is_ok_and(|v| v.is_object()) => s,
        Value::Object(_) => args.to_string(),
        _ => return None,
    };
    (!name.is_empty()).then_some((name, args))
}

/// Mistral's newer form: `name[ARGS]{..}` for each call, one after another.
fn mistral_args(body: &str) -> Option<Vec<RawCall>> {
    let mut calls = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find("[ARGS]") {
        let name = rest[..at].trim().trim_start_matches(MISTRAL_MARK).trim();
        let after = &rest[at + "[ARGS]".len()..];
        let mut de = serde_json::Deserializer::from_str(after).into_iter::<Value>();
        let args = de.next()?.ok()?;
        if name.is_empty() || !args.is_object() {
            return None;
        }
        calls.push((name.to_owned(), args.to_string()));
        rest = &after[de.byte_offset()..];
    }
    (rest.trim().is_empty() && !calls.is_empty()).then_some(calls)
}

/// Call ids: `call_` and 24 characters, unique within the process.
#[derive(Debug)]
struct IdMaker {
    nonce: u64,
    next: u32,
}

impl IdMaker {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::time::{SystemTime, UNIX_EPOCH};
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default();
        Self { nonce: now ^ COUNT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed), next: 0 }
    }

    fn call(&mut self, (name, arguments): RawCall) -> ToolCall {
        self.next += 1;
        ToolCall { id: format!("call_{:016x}{:08x}", self.nonce, self.next), name, arguments }
    }
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;
