// SPDX-License-Identifier: EUPL-1.2
use serde_json::json;

use super::*;
use crate::{Message, Role};

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

/// Feeds `text` one character at a time (the hardest split) and joins the pieces.
fn stream(format: ToolCallFormat, text: &str) -> Vec<Piece> {
    let mut p = ToolCallParser::new(format);
    let mut out: Vec<Piece> = Vec::new();
    for ch in text.chars() {
        out.extend(p.push(&ch.to_string()));
    }
    out.extend(p.finish());
    // Adjacent text pieces joined, so that the split does not matter.
    let mut joined: Vec<Piece> = Vec::new();
    for piece in out {
        match (joined.last_mut(), piece) {
            (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
            (_, p) => joined.push(p),
        }
    }
    joined
}

fn call(name: &str, args: Value) -> (String, Value) {
    (name.to_owned(), args)
}

fn calls(pieces: &[Piece]) -> Vec<(String, Value)> {
    pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Call(c) => Some((c.name.clone(), serde_json::from_str(&c.arguments).unwrap())),
            Piece::Text(_) => None,
        })
        .collect()
}

fn text(pieces: &[Piece]) -> String {
    pieces.iter().filter_map(|p| if let Piece::Text(t) = p { Some(t.as_str()) } else { None }).collect()
}

#[test]
fn hermes_calls_stream_out_between_text() {
    let answer = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n\
                  </tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>";
    let pieces = stream(ToolCallFormat::Hermes, answer);
    assert_eq!(text(&pieces), "Let me check.\n\n");
    assert_eq!(
        calls(&pieces),
        [call("get_weather", json!({"city": "Paris"})), call("get_weather", json!({"city": "Rome"}))]
    );
    let ids: Vec<&str> =
        pieces.iter().filter_map(|p| if let Piece::Call(c) = p { Some(c.id.as_str()) } else { None }).collect();
    assert!(ids[0] != ids[1] && ids.iter().all(|i| i.starts_with("call_") && i.len() == 29), "{ids:?}");
}

#[test]
fn text_that_only_looks_like_a_tag_is_kept() {
    let pieces = stream(ToolCallFormat::Hermes, "a <tool no> b <tool_call>not json</tool_call> c <tool_ca");
    assert!(calls(&pieces).is_empty());
    assert_eq!(text(&pieces), "a <tool no> b <tool_call>not json</tool_call> c <tool_ca");
    // An unclosed call that parses is still a call (the model stopped at its end token).
    let pieces = stream(ToolCallFormat::Hermes, "<tool_call>{\"name\": \"f\", \"arguments\": {}}");
    assert_eq!(calls(&pieces), [call("f", json!({}))]);
}

#[test]
fn text_streams_before_the_end() {
    let mut p = ToolCallParser::new(ToolCallFormat::Hermes);
    assert_eq!(p.push("Hello there, <tool"), [Piece::Text("Hello there, ".into())]);
    assert_eq!(p.push("box> yes"), [Piece::Text("<toolbox> yes".into())]);
    let mut p = ToolCallParser::new(ToolCallFormat::Json);
    assert_eq!(p.push("  Sure"), [Piece::Text("  Sure".into())]);
}

#[test]
fn llama3_json_answers_are_calls() {
    let pieces = stream(
        ToolCallFormat::Llama3,
        "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
    );
    assert_eq!(calls(&pieces), [call("get_weather", json!({"city": "Oslo"}))]);
    assert_eq!(text(&pieces), "");
    let pieces = stream(
        ToolCallFormat::Llama3,
        "{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": 1}}",
    );
    assert_eq!(calls(&pieces), [call("a", json!({})), call("b", json!({"x": 1}))]);
    // JSON that is not a call stays text.
    let pieces = stream(ToolCallFormat::Llama3, "{\"answer\": 42}");
    assert_eq!((calls(&pieces).len(), text(&pieces).as_str()), (0, "{\"answer\": 42}"));
}

#[test]
fn mistral_both_forms() {
    let pieces = stream(ToolCallFormat::Mistral, "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": 1}}]");
    assert_eq!(calls(&pieces), [call("f", json!({"a": 1}))]);
    let pieces = stream(ToolCallFormat::Mistral, "ok [TOOL_CALLS]f[ARGS]{\"a\": 1}g[ARGS]{}");
    assert_eq!(text(&pieces), "ok ");
    assert_eq!(calls(&pieces), [call("f", json!({"a": 1})), call("g", json!({}))]);
}

#[test]
fn the_fallback_reads_tags_fences_and_bare_json() {
    for answer in [
        "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": \"x\"}}</tool_call>",
        "```json\n{\"name\": \"f\", \"arguments\": {\"a\": \"x\"}}\n```",
        "{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": \\\"x\\\"}\"}",
        "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": {\"a\": \"x\"}}}]",
    ] {
        let (content, found) = parse_tool_calls(ToolCallFormat::Json, answer);
        assert_eq!(content, "", "{answer}");
        assert_eq!(found.len(), 1, "{answer}");
        assert_eq!(
            (found[0].name.as_str(), serde_json::from_str::<Value>(&found[0].arguments).unwrap()),
            ("f", json!({"a": "x"}))
        );
    }
    let (content, found) = parse_tool_calls(ToolCallFormat::Json, "Plain words.");
    assert_eq!((content.as_str(), found.len()), ("Plain words.", 0));
}

#[test]
fn formats_are_detected_from_templates() {
    assert_eq!(ToolCallFormat::detect("{{ '<tool_call>' }}"), ToolCallFormat::Hermes);
    assert_eq!(ToolCallFormat::detect("[AVAILABLE_TOOLS] [TOOL_CALLS]"), ToolCallFormat::Mistral);
    assert_eq!(ToolCallFormat::detect("<|start_header_id|>ipython"), ToolCallFormat::Llama3);
    assert_eq!(ToolCallFormat::detect("<|im_start|>"), ToolCallFormat::Json);
}

#[test]
fn tool_calls_serialise_for_templates_and_parse_from_openai() {
    let c = ToolCall { id: "call_1".into(), name: "f".into(), arguments: "{\"a\":1}".into() };
    assert_eq!(
        serde_json::to_value(&c).unwrap(),
        json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}})
    );
    let wire = json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}});
    assert_eq!(serde_json::from_value::<ToolCall>(wire).unwrap(), c);
    let obj = json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}});
    assert_eq!(serde_json::from_value::<ToolCall>(obj).unwrap(), c);
}

#[test]
fn tools_are_validated() {
    assert!(validate_tools(&[weather()]).is_ok());
    let e = validate_tools(&[weather(), json!({"type": "function", "function": {}})]).unwrap_err().to_string();
    assert!(e.contains("tools[1]") && e.contains("function.name"), "{e}");
    let e = validate_tools(&[json!({"type": "retrieval"})]).unwrap_err().to_string();
    assert!(e.contains("tools[0]") && e.contains("\"type\": \"function\""), "{e}");
}

#[test]
fn call_grammars_name_the_tools_and_their_parameters() {
    let Constraint::Lark(g) = call_grammar(ToolCallFormat::Hermes, &[weather()], None, false).unwrap() else {
        panic!("a Lark grammar")
    };
    assert!(g.contains("<tool_call>") && g.contains("\"const\":\"get_weather\"") && g.contains("\"city\""), "{g}");
    assert!(g.starts_with("start: tc\n"), "{g}");
    let Constraint::Lark(g) = call_grammar(ToolCallFormat::Llama3, &[weather()], Some("get_weather"), true).unwrap()
    else {
        panic!("a Lark grammar")
    };
    assert!(g.contains("\"parameters\"") && g.contains("(\"; \" call)*"), "{g}");
    let e = call_grammar(ToolCallFormat::Hermes, &[weather()], Some("nope"), false).unwrap_err().to_string();
    assert!(e.contains("tool_choice") && e.contains("nope"), "{e}");
    assert!(call_grammar(ToolCallFormat::Json, &[], None, false).is_err());
}

#[test]
fn the_fallback_prompt_lists_every_tool() {
    let p = fallback_prompt(&[weather()]);
    assert!(p.contains("\"name\":\"get_weather\"") && p.contains("<tool_call>"), "{p}");
}

#[test]
fn the_fallback_writes_tools_calls_and_results_as_text() {
    let tool = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
    let call = ToolCall { id: "call_1".into(), name: "f".into(), arguments: "{\"a\":1}".into() };
    let history = [
        Message::user("hi"),
        Message::assistant("").with_tool_calls([call]),
        Message::tool("call_1", Some("f".into()), "42"),
    ];
    let out = fallback_messages(&history, &[tool]);
    assert_eq!(out.len(), 4);
    assert_eq!(out[0].role, Role::SYSTEM);
    assert!(out[0].content.contains("\"name\":\"f\""), "{}", out[0].content);
    assert_eq!(out[2].content, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\":1}}\n</tool_call>");
    assert_eq!((out[3].role.as_ref(), out[3].content.as_str()), ("user", "<tool_response>\n42\n</tool_response>"));
    // A system message of the caller's keeps its text first.
    let out = fallback_messages(
        &[Message::system("Be brief."), Message::user("x")],
        &[json!({"type": "function", "function": {"name": "g"}})],
    );
    assert!(out[0].content.starts_with("Be brief.\n\n"), "{}", out[0].content);
    assert_eq!(out.len(), 2);
}
