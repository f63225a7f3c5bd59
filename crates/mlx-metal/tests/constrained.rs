// SPDX-License-Identifier: EUPL-1.2
//! Constrained decoding and tool calls through the public API: every row of
//! a batch matches its own JSON Schema (sampled or greedy, on the real
//! SmolLM2), a constrained row batched equals it alone, regular expressions
//! and Lark grammars hold even on a tiny model of random weights, a forced
//! tool call is always a well-formed call (SmolLM2's template knows no tools:
//! the fallback prompt; a tiny model with a Qwen-style tools template: the
//! Hermes form, with tools and tool results rendered by the template), and
//! constraints that do not compile are refused by name.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;

use inference_core::tools::{ToolCallFormat, parse_tool_calls};
use inference_core::{
    CancelToken, Completion, Constraint, Error as CoreError, GenerateSettings, LoadSettings, Message, Registry,
    TextModel, ToolCall, ToolChoice,
};
use serde_json::{Value, json};

fn load(path: &Path) -> Arc<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let model = reg
        .load_model(path, &LoadSettings::default().backend("metal").device(inference_core::Device::Cpu))
        .unwrap_or_else(|e| panic!("loading {}: {}", path.display(), e.report()));
    Arc::from(model)
}

/// Whether `v` is valid against `schema` (the keywords the tests use).
fn valid(v: &Value, schema: &Value) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{v} against {schema}: {why}"));
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(v)
    {
        return fail("not one of the enum");
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(o) = v.as_object() else { return fail("not an object") };
            let props = schema.get("properties").and_then(Value::as_object);
            for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !o.contains_key(key.as_str().unwrap_or_default()) {
                    return fail(&format!("{key} is missing"));
                }
            }
            for (k, x) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => valid(x, s)?,
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        return fail(&format!("{k} is not allowed"));
                    }
                    None => {}
                }
            }
        }
        Some("array") => {
            let Some(items) = v.as_array() else { return fail("not an array") };
            let n = items.len() as u64;
            if schema.get("minItems").and_then(Value::as_u64).is_some_and(|m| n < m)
                || schema.get("maxItems").and_then(Value::as_u64).is_some_and(|m| n > m)
            {
                return fail("wrong length");
            }
            for x in items {
                valid(x, schema.get("items").unwrap_or(&Value::Bool(true)))?;
            }
        }
        Some("integer") if !v.is_i64() && !v.is_u64() => return fail("not an integer"),
        Some("integer") => {
            let n = v.as_i64().unwrap_or(i64::MAX);
            if schema.get("minimum").and_then(Value::as_i64).is_some_and(|m| n < m)
                || schema.get("maximum").and_then(Value::as_i64).is_some_and(|m| n > m)
            {
                return fail("out of range");
            }
        }
        Some("string") if !v.is_string() => return fail("not a string"),
        Some("boolean") if !v.is_boolean() => return fail("not a boolean"),
        _ => {}
    }
    Ok(())
}

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
            "maximum": 120}}, "required": ["name", "age"], "additionalProperties": false}),
        json!({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}),
        json!({"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "bright": {"type":
            "boolean"}}, "required": ["colour", "bright"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"city": {"type": "object", "properties": {"name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}}, "required": ["name", "tags"]}},
            "required": ["city"]}),
    ]
}

/// Starts one chat per settings at once (they share the engine's batch) and collects each.
fn completions_at_once(model: &dyn TextModel, prompt: &str, settings: &[GenerateSettings]) -> Vec<Completion> {
    let streams: Vec<_> =
        settings.iter().map(|s| model.chat(&[Message::user(prompt)], s, CancelToken::new()).expect("starts")).collect();
    streams.into_iter().map(|s| s.complete().expect("completes")).collect()
}

/// [`completions_at_once`]'s texts.
fn chats_at_once(model: &dyn TextModel, prompt: &str, settings: &[GenerateSettings]) -> Vec<String> {
    completions_at_once(model, prompt, settings).into_iter().map(|c| c.text).collect()
}

#[test]
fn every_row_of_a_batch_matches_its_own_schema() {
    let Some(dir) = common::real_model("smollm2-135m-instruct") else { return };
    let model = load(&dir);
    let mut settings = Vec::new();
    for (i, schema) in schemas().into_iter().enumerate() {
        let base = GenerateSettings::default().max_tokens(80).constraint(Constraint::JsonSchema(schema));
        settings.push(base.clone());
        settings.push(base.temperature(1.0).seed(i as u64 + 7));
    }
    // Any object: the model may nest until the limit cuts it off (as OpenAI's does); a sampled
    // row ends by itself.
    settings
        .push(GenerateSettings::default().max_tokens(60).temperature(1.0).seed(1).constraint(Constraint::JsonObject));
    let done = completions_at_once(model.as_ref(), "Describe something as JSON.", &settings);
    for (c, s) in done.iter().zip(&settings) {
        let text = &c.text;
        if s.constraint == Some(Constraint::JsonObject) && c.tokens.len() == s.max_tokens {
            assert!(text.starts_with('{'), "{text:?}");
            continue;
        }
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
        match s.constraint.as_ref() {
            Some(Constraint::JsonSchema(schema)) => valid(&v, schema).unwrap(),
            _ => assert!(v.is_object(), "{text}"),
        }
    }
}

#[test]
fn a_constrained_row_batched_equals_it_alone() {
    let Some(dir) = common::real_model("smollm2-135m-instruct") else { return };
    let model = load(&dir);
    let constrained =
        GenerateSettings::default().max_tokens(40).constraint(Constraint::JsonSchema(schemas()[0].clone()));
    let alone = chats_at_once(model.as_ref(), "Who are you?", std::slice::from_ref(&constrained));
    let plain = GenerateSettings::default().max_tokens(24).ignore_eos(true);
    let batched = chats_at_once(model.as_ref(), "Who are you?", &[plain.clone(), constrained, plain]);
    assert_eq!(batched[1], alone[0]);
}

#[test]
fn patterns_and_grammars_hold_on_random_weights() {
    let model = load(&common::tiny_model("qwen3-tiny"));
    let rx = "(cat|dog)s? [0-9]{2,3}";
    let lark = "start: greeting \" \" name\ngreeting: \"hello\" | \"hi\"\nname: /[a-z]{3,5}/\n";
    for seed in 0..4 {
        let s = GenerateSettings::default().max_tokens(20).temperature(1.0).seed(seed);
        let text = model.generate("x", &s.clone().constraint(Constraint::Regex(rx.into())), CancelToken::new());
        let text = text.unwrap().complete().unwrap().text;
        let (word, num) = text.split_once(' ').unwrap_or_else(|| panic!("{text:?}"));
        assert!(["cat", "cats", "dog", "dogs"].contains(&word), "{text:?}");
        assert!((2..=3).contains(&num.len()) && num.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
        let text = model.generate("x", &s.constraint(Constraint::Lark(lark.into())), CancelToken::new());
        let text = text.unwrap().complete().unwrap().text;
        let (greeting, name) = text.split_once(' ').unwrap_or_else(|| panic!("{text:?}"));
        assert!(["hello", "hi"].contains(&greeting), "{text:?}");
        assert!((3..=5).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase()), "{text:?}");
    }
}

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

fn clock() -> Value {
    json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties":
        {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}})
}

/// The one call `text` holds, checked against its tool's parameters.
fn one_call(format: ToolCallFormat, text: &str, tools: &[Value]) -> ToolCall {
    let (_, calls) = parse_tool_calls(format, text);
    assert_eq!(calls.len(), 1, "{text:?}");
    let call = calls.into_iter().next().unwrap();
    let tool = tools.iter().find(|t| t["function"]["name"] == call.name).unwrap_or_else(|| panic!("{text:?}"));
    valid(&serde_json::from_str(&call.arguments).unwrap(), &tool["function"]["parameters"]).unwrap();
    call
}

#[test]
fn a_forced_call_on_smollm2_is_well_formed() {
    let Some(dir) = common::real_model("smollm2-135m-instruct") else { return };
    let model = load(&dir);
    assert_eq!(model.info().tool_call_format, ToolCallFormat::Json, "ChatML without tools: the fallback");
    let tools = [weather(), clock()];
    let base = GenerateSettings::default().max_tokens(60).tools(tools.clone()).parallel_tool_calls(false);
    let settings = [
        base.clone().tool_choice(ToolChoice::Required),
        base.clone().tool_choice(ToolChoice::Function("get_time".into())).temperature(1.0).seed(3),
    ];
    let texts = chats_at_once(model.as_ref(), "What is the weather in Paris?", &settings);
    assert_eq!(one_call(ToolCallFormat::Json, &texts[0], &tools).name, "get_weather");
    assert_eq!(one_call(ToolCallFormat::Json, &texts[1], &tools).name, "get_time");
}

/// qwen3-tiny with `testdata/templates/qwen-tools.jinja` (a tools template in Qwen 2.5's form: tools
/// in the system turn, calls in `<tool_call>` tags, results in `<tool_response>` tags inside a
/// user turn) as its chat template, and room for its long system turn, in a temporary directory.
fn qwen_with_tools() -> tempfile::TempDir {
    let src = common::tiny_model("qwen3-tiny");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/templates/qwen-tools.jinja");
    config["chat_template"] = Value::String(std::fs::read_to_string(template).unwrap());
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    // The tools' system turn is longer than the fixture's 128 positions.
    let model_config = dir.path().join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&model_config).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(2048);
    std::fs::write(&model_config, serde_json::to_vec(&config).unwrap()).unwrap();
    dir
}

#[test]
fn a_qwen_style_template_renders_tools_and_forced_calls_are_hermes_calls() {
    let dir = qwen_with_tools();
    let tokenizer = mlx_metal::tokenizer::Tokenizer::from_dir(dir.path()).unwrap();
    let template = mlx_metal::chat::ChatTemplate::for_model(&tokenizer, "qwen3").unwrap();
    assert!(template.supports_tools());
    assert_eq!(template.tool_call_format(), ToolCallFormat::Hermes);
    let call = ToolCall { id: "call_1".into(), name: "get_weather".into(), arguments: "{\"city\": \"Oslo\"}".into() };
    let history = [
        Message::user("Weather in Oslo?"),
        Message::assistant("").with_tool_calls([call]),
        Message::tool("call_1", Some("get_weather".into()), "{\"celsius\": 3}"),
    ];
    let settings = GenerateSettings::default().tools([weather()]);
    let (ids, _) = template.render_chat(&tokenizer, &history, &settings).unwrap();
    let text = tokenizer.decode(&ids, false).unwrap();
    // `tojson` writes as Python's `json.dumps` does; `trim_blocks` drops a block's first new line.
    assert!(text.contains("<tools>{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""), "{text}");
    assert!(text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"), "{text}");
    assert!(text.contains("<|im_start|>user\n<tool_response>\n{\"celsius\": 3}\n</tool_response>"), "{text}");

    let model = load(dir.path());
    assert_eq!(model.info().tool_call_format, ToolCallFormat::Hermes);
    let tools = [weather(), clock()];
    for seed in 0..3 {
        let s = GenerateSettings::default().max_tokens(80).temperature(1.0).seed(seed).tools(tools.clone());
        let forced =
            [s.clone().tool_choice(ToolChoice::Required), s.tool_choice(ToolChoice::Function("get_time".into()))];
        let texts = chats_at_once(model.as_ref(), "What time is it?", &forced);
        assert!(texts[0].starts_with("<tool_call>\n"), "{:?}", texts[0]);
        one_call(ToolCallFormat::Hermes, &texts[0], &tools);
        assert_eq!(one_call(ToolCallFormat::Hermes, &texts[1], &tools).name, "get_time");
    }
}

#[test]
fn constraints_that_do_not_compile_are_refused_by_name() {
    let model = load(&common::tiny_model("qwen3-tiny"));
    let bad = |c: Constraint| {
        let s = GenerateSettings::default().max_tokens(4).constraint(c);
        match model.generate("x", &s, CancelToken::new()) {
            Err(e @ CoreError::InvalidSetting { .. }) => e.to_string(),
            Err(e) => panic!("not an invalid setting: {e}"),
            Ok(_) => panic!("accepted"),
        }
    };
    let e = bad(Constraint::JsonSchema(json!({"type": "nonsense"})));
    assert!(e.contains("constraint") && e.contains("nonsense"), "{e}");
    let e = bad(Constraint::Lark("start: undefined_rule".into()));
    assert!(e.contains("constraint") && e.contains("lark"), "{e}");
    let e = bad(Constraint::Regex(String::new()));
    assert!(e.contains("constraint.regex"), "{e}");
    let s = GenerateSettings::default().tools([weather()]).tool_choice(ToolChoice::Function("nope".into()));
    let Err(e) = model.chat(&[Message::user("x")], &s, CancelToken::new()) else { panic!("accepted") };
    let e = e.to_string();
    assert!(e.contains("tool_choice") && e.contains("nope"), "{e}");
}
