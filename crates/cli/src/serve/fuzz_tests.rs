// SPDX-License-Identifier: EUPL-1.2
//! Property-based fuzzing of what the server reads from clients, without a model: request bodies
//! of `/v1/chat/completions`, `/v1/completions` and `/v1/messages` as arbitrary bytes, arbitrary
//! JSON with the real field names mixed in, and real requests mutated. Each goes through the
//! handlers' own reading (`api::parse`, the common, sampling and tool fields, the endpoint's own
//! fields and their checks), then through what a backend does with accepted tools (the fallback
//! prompt, the grammar of a forced call). A request must be accepted or refused with a 4xx
//! `ApiError` that says what is wrong, never panic. The model's output read for tool calls
//! (`CallStream`, `BlockStream`) is fuzzed too: any text, cut anywhere.

use inference_core::tools::{ToolCallFormat, call_grammar, fallback_messages, fallback_prompt};
use inference_core::{GenerateSettings, Message, ToolChoice};
use parity::fuzz;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::anthropic::MessagesRequest;
use super::anthropic_tools::BlockStream;
use super::api::{self, ChatRequest, Common, CompletionRequest, Limits, Sampling};
use super::error::ApiError;
use super::tools::{CallStream, ToolFields, call_format};

const CASES: u32 = 512;

const LIMITS: Limits = Limits { max_tokens: 256, default_max_tokens: 64 };

const FORMATS: &[ToolCallFormat] =
    &[ToolCallFormat::Hermes, ToolCallFormat::Llama3, ToolCallFormat::Mistral, ToolCallFormat::Json];

/// The requests' field names and values (OpenAI's and Anthropic's).
const WORDS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "tool_calls",
    "tool_call_id",
    "name",
    "id",
    "function",
    "arguments",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "repetition_context_size",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "n",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
    "stream",
    "stream_options",
    "include_usage",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "json_schema",
    "json_object",
    "schema",
    "parameters",
    "properties",
    "required",
    "description",
    "system",
    "stop_sequences",
    "input",
    "input_schema",
    "tool_use",
    "tool_result",
    "tool_use_id",
    "is_error",
    "disable_parallel_tool_use",
    "user",
    "assistant",
    "developer",
    "tool",
    "auto",
    "none",
    "any",
    "object",
    "string",
    "integer",
    "array",
    "image_url",
];

/// Real requests of each endpoint, with tools, to mutate.
fn requests() -> Vec<(Endpoint, Value)> {
    let tool = json!({"type": "function", "function": {"name": "get", "description": "d",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["city"]}}});
    let call =
        json!({"id": "call_1", "type": "function", "function": {"name": "get", "arguments": "{\"city\":\"x\"}"}});
    let chat = json!({"model": "m", "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "n": 2,
        "logprobs": true, "top_logprobs": 2, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "get"}}, "parallel_tool_calls": false});
    let schema = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}});
    let completion = json!({"model": "m", "prompt": "once", "max_tokens": 4, "logprobs": 2, "seed": 3, "echo": false});
    let anthropic = json!({"model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "s"}],
        "stop_sequences": ["END"], "temperature": 0.2, "top_k": 3,
        "messages": [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "t"},
                {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}],
        "tools": [{"name": "get", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "get", "disable_parallel_tool_use": true}});
    vec![
        (Endpoint::Chat, chat),
        (Endpoint::Chat, schema),
        (Endpoint::Completion, completion),
        (Endpoint::Messages, anthropic),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
    Messages,
}

const ENDPOINTS: &[Endpoint] = &[Endpoint::Chat, Endpoint::Completion, Endpoint::Messages];

/// What `parse_request` and the endpoint's handler read from `body`, in their order, up to the
/// engine: the conversation or prompt and the settings.
fn read(endpoint: Endpoint, body: &[u8]) -> Result<(Vec<Message>, GenerateSettings), ApiError> {
    if endpoint == Endpoint::Messages {
        let (request, _) = api::parse::<MessagesRequest>(body)?;
        let conversation = request.messages()?;
        return Ok((conversation, request.settings(LIMITS)?));
    }
    let (messages, value) = match endpoint {
        Endpoint::Chat => {
            let (own, value) = api::parse::<ChatRequest>(body)?;
            (Some(own), value)
        }
        _ => {
            let (_, value) = api::parse::<CompletionRequest>(body)?;
            (None, value)
        }
    };
    let common: Common = api::from_value(&value)?;
    let _ = (common.streaming(), common.include_usage(), common.model.as_deref());
    let sampling: Sampling = api::from_value(&value)?;
    let fields: ToolFields = api::from_value(&value)?;
    let settings = fields.apply(sampling.settings(LIMITS)?)?;
    settings.validate()?;
    sampling.choices()?;
    let conversation = match messages {
        Some(m) => m.messages()?,
        None => {
            let own: CompletionRequest = api::from_value(&value)?;
            vec![Message::user(own.prompt()?)]
        }
    };
    Ok((conversation, settings))
}

/// Reads `body` as `endpoint` and checks the outcome; accepted tools go on through what a
/// backend does with them.
fn check(endpoint: Endpoint, body: &[u8]) -> Result<(), TestCaseError> {
    match read(endpoint, body) {
        Ok((conversation, settings)) => {
            prop_assert!(!conversation.is_empty() || endpoint == Endpoint::Completion);
            prop_assert!(settings.max_tokens >= 1 && settings.max_tokens <= LIMITS.max_tokens);
            if !settings.tools.is_empty() {
                let _ = fallback_prompt(&settings.tools);
                let _ = fallback_messages(&conversation, &settings.tools);
                let only = match &settings.tool_choice {
                    ToolChoice::Function(name) => Some(name.as_str()),
                    _ => None,
                };
                for format in FORMATS {
                    prop_assert_eq!(
                        call_format(&settings, *format).is_some(),
                        settings.tool_choice != ToolChoice::None
                    );
                    if let Err(e) = call_grammar(*format, &settings.tools, only, settings.parallel_tool_calls) {
                        prop_assert!(!e.report().is_empty());
                    }
                }
            }
        }
        Err(e) => {
            prop_assert!(e.status.is_client_error(), "a bad request answered {}: {}", e.status, e.message);
            prop_assert!(!e.message.trim().is_empty(), "an error without a message");
            prop_assert!(e.param.as_deref().is_none_or(|p| !p.is_empty()), "an empty param");
        }
    }
    Ok(())
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    proptest::sample::select(ENDPOINTS)
}

/// Model output cut into pieces anywhere, tool-call markup mixed in.
fn output() -> impl Strategy<Value = Vec<String>> {
    let piece = prop_oneof![
        3 => "\\PC{0,12}",
        2 => proptest::sample::select(vec![
            "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{\"name\": \"get\", \"arguments\": {",
            "\"city\": \"x\"}}", "[{\"name\": \"f\", \"arguments\": {}}]", "{\"name\": ", "\"parameters\": {}}", "\n",
            "}", "{", "\"", "é", "😀",
        ]).prop_map(str::to_owned),
        1 => any::<String>(),
    ];
    prop::collection::vec(piece, 0..12)
}

proptest! {
    #![proptest_config(fuzz::config(CASES))]

    #[test]
    fn arbitrary_bodies_are_refused_cleanly(endpoint in endpoint(), body in prop::collection::vec(any::<u8>(), 0..128)) {
        check(endpoint, &body)?;
    }

    #[test]
    fn arbitrary_json_requests_are_accepted_or_refused(endpoint in endpoint(), value in prop_oneof![
        4 => fuzz::json_object(WORDS),
        1 => fuzz::json_value(WORDS),
    ]) {
        check(endpoint, &serde_json::to_vec(&value).unwrap_or_default())?;
    }

    #[test]
    fn mutated_requests_are_accepted_or_refused((endpoint, value) in (0..requests().len()).prop_flat_map(|i| {
        let (endpoint, base) = requests()[i].clone();
        (Just(endpoint), fuzz::mutated_json(base, WORDS, 4))
    })) {
        check(endpoint, &serde_json::to_vec(&value).unwrap_or_default())?;
    }

    #[test]
    fn model_output_is_read_for_calls_in_any_pieces(pieces in output(), format in proptest::sample::select(FORMATS)) {
        let text: String = pieces.concat();
        let mut openai = CallStream::new(Some(format));
        let mut anthropic = BlockStream::new(Some(format));
        let mut plain = CallStream::new(None);
        let mut deltas = Vec::new();
        for p in &pieces {
            deltas.extend(openai.push(p));
            let _ = anthropic.push(p);
            let _ = plain.push(p);
        }
        let (rest, calls) = openai.finish();
        deltas.extend(rest);
        let (_, tool_use) = anthropic.finish();
        prop_assert_eq!(calls > 0, tool_use);
        prop_assert_eq!(deltas.iter().filter(|d| d.get("tool_calls").is_some()).count(), calls);
        let shown: String = deltas.iter().filter_map(|d| d.get("content").and_then(Value::as_str)).collect();
        prop_assert!(shown.len() <= text.len(), "more text out than in");
        if calls == 0 {
            prop_assert_eq!(shown, text, "text without calls is passed on whole");
        }
    }
}

#[test]
fn the_real_requests_are_accepted() {
    for (endpoint, value) in requests() {
        let body = serde_json::to_vec(&value).unwrap();
        let (conversation, settings) = read(endpoint, &body).unwrap_or_else(|e| panic!("{endpoint:?}: {}", e.message));
        assert!(!conversation.is_empty());
        assert!(endpoint == Endpoint::Completion || !settings.tools.is_empty() || settings.constraint.is_some());
    }
}
