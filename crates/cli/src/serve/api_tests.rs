// SPDX-License-Identifier: EUPL-1.2
use super::*;

const LIMITS: Limits = Limits { max_tokens: 100, default_max_tokens: 512 };

fn sampling(json: &str) -> Result<GenerateSettings, ApiError> {
    let (s, _): (Sampling, Value) = parse(json.as_bytes())?;
    s.settings(LIMITS)
}

#[test]
fn fields_become_settings() {
    let s = sampling(
        r#"{"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 4, "min_p": 0.1, "seed": 3,
            "repetition_penalty": 1.1, "stop": "END", "n": 1, "presence_penalty": 0, "unknown": [1]}"#,
    )
    .unwrap();
    assert_eq!((s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed), (5, 0.7, 0.9, Some(4), Some(3)));
    assert_eq!(s.stop_strings, ["END"]);
    assert_eq!(sampling("{}").unwrap().max_tokens, 100, "the default is capped by the limit");
    assert_eq!(sampling(r#"{"max_tokens": 9, "max_completion_tokens": 7}"#).unwrap().max_tokens, 7);
    assert_eq!(sampling(r#"{"stop": ["a", "b"]}"#).unwrap().stop_strings, ["a", "b"]);
}

#[test]
fn bad_fields_are_named() {
    let param = |json: &str| sampling(json).unwrap_err().param;
    assert_eq!(param(r#"{"temperature": -1}"#).as_deref(), Some("temperature"));
    assert_eq!(param(r#"{"top_p": 1.5}"#).as_deref(), Some("top_p"));
    assert_eq!(param(r#"{"top_k": -2}"#).as_deref(), Some("top_k"));
    assert_eq!(param(r#"{"n": 0}"#).as_deref(), Some("n"));
    assert_eq!(param(r#"{"n": 17}"#).as_deref(), Some("n"));
    assert_eq!(param(r#"{"max_tokens": 101}"#).as_deref(), Some("max_tokens"));
    assert_eq!(param(r#"{"max_completion_tokens": 0}"#).as_deref(), Some("max_tokens"));
    assert_eq!(param(r#"{"max_tokens": -1}"#).as_deref(), Some("max_tokens"));
    assert_eq!(param(r#"{"temperature": "hot"}"#).as_deref(), Some("temperature"));
    assert_eq!(param(r#"{"stop": [""]}"#).as_deref(), Some("stop"));
    assert_eq!(param(r#"{"frequency_penalty": 0.5}"#).as_deref(), Some("frequency_penalty"));
    assert_eq!(param(r#"{"logprobs": "yes"}"#).as_deref(), Some("logprobs"));
    assert_eq!(param(r#"{"logprobs": -1}"#).as_deref(), Some("logprobs"));
    assert_eq!(param(r#"{"logprobs": 21}"#).as_deref(), Some("logprobs"));
    assert_eq!(param(r#"{"logprobs": true, "top_logprobs": 21}"#).as_deref(), Some("top_logprobs"));
    assert_eq!(param(r#"{"top_logprobs": 2}"#).as_deref(), Some("top_logprobs"));
    assert_eq!(param(r#"{"stop": ["a", "b", "c", "d", "e"]}"#).as_deref(), Some("stop"));
    let top = |json: &str| sampling(json).unwrap().top_logprobs;
    assert_eq!(top(r#"{"logprobs": false}"#), None);
    assert_eq!(top(r#"{"logprobs": false, "top_logprobs": 0}"#), None);
    assert_eq!(top(r#"{"logprobs": true}"#), Some(0));
    assert_eq!(top(r#"{"logprobs": true, "top_logprobs": 5}"#), Some(5));
    assert_eq!(top(r#"{"logprobs": 0}"#), Some(0), "completions: the chosen token's only");
    assert_eq!(top(r#"{"logprobs": 3}"#), Some(3));
    let e = sampling(r#"{"temperature": "hot"}"#).unwrap_err();
    assert!(e.message.starts_with("invalid field temperature: invalid type: string \"hot\""), "{}", e.message);
    let e = sampling(r#"{"max_tokens": 101}"#).unwrap_err();
    assert_eq!(e.message, "max_tokens = 101 is more than this server's limit of 100");
}

#[test]
fn malformed_bodies_are_refused() {
    let e = parse::<Sampling>(b"{\"model\": ").unwrap_err();
    assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
    assert!(e.message.starts_with("the request body is not valid JSON: EOF while parsing"), "{}", e.message);
    assert_eq!(e.code, Some("invalid_json"));
    let e = parse::<Sampling>(b"[1, 2]").unwrap_err();
    assert_eq!(e.message, "the request body must be a JSON object");
    assert!(parse::<Sampling>(b"").is_err());
    assert!(parse::<Sampling>(&[0xff, 0x00]).is_err());
}

#[test]
fn messages_are_read() {
    let (r, _): (ChatRequest, Value) = parse(
        br#"{"messages": [{"role": "developer", "content": "be kind"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null}]}"#,
    )
    .unwrap();
    let m = r.messages().unwrap();
    assert_eq!(m, [Message::system("be kind"), Message::user("ab"), Message::assistant("")]);
}

#[test]
fn bad_messages_are_named() {
    let e = parse::<ChatRequest>(br#"{"model": "x"}"#).unwrap_err();
    assert_eq!(e.message, "invalid request: missing field `messages`");
    let e = parse::<ChatRequest>(br#"{"messages": [{"content": "hi"}]}"#).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages[0]"));
    let (r, _): (ChatRequest, Value) = parse(br#"{"messages": []}"#).unwrap();
    assert_eq!(r.messages().unwrap_err().param.as_deref(), Some("messages"));
    let (r, _): (ChatRequest, Value) =
        parse(br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#).unwrap();
    assert_eq!(r.messages().unwrap_err().param.as_deref(), Some("messages[0].content[0]"));
    let (r, _): (ChatRequest, Value) = parse(br#"{"messages": [{"role": "", "content": "x"}]}"#).unwrap();
    assert_eq!(r.messages().unwrap_err().param.as_deref(), Some("messages[0].role"));
    for (role, says) in [
        ("wizard", "messages[1].role \"wizard\" is not a role; use system, developer, user, assistant or tool"),
        ("function", "messages[1].role \"function\" is OpenAI's retired role: send tool results as role \"tool\""),
    ] {
        let body =
            format!(r#"{{"messages": [{{"role": "user", "content": "x"}}, {{"role": "{role}", "content": "y"}}]}}"#);
        let (r, _): (ChatRequest, Value) = parse(body.as_bytes()).unwrap();
        let e = r.messages().unwrap_err();
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("messages[1].role"), says));
    }
}

#[test]
fn prompts_are_one_string() {
    let (r, _): (CompletionRequest, Value) = parse(br#"{"prompt": ["only"]}"#).unwrap();
    assert_eq!(r.prompt().unwrap(), "only");
    let (r, _): (CompletionRequest, Value) = parse(br#"{"prompt": ["a", "b"]}"#).unwrap();
    assert_eq!(r.prompt().unwrap_err().param.as_deref(), Some("prompt"));
    assert_eq!(parse::<CompletionRequest>(br#"{"prompt": [1, 2]}"#).unwrap_err().param.as_deref(), Some("prompt"));
    // Legacy fields are refused by name, not ignored; their neutral values pass.
    for (body, param) in [
        (r#"{"prompt": "a", "echo": true}"#, "echo"),
        (r#"{"prompt": "a", "suffix": "end"}"#, "suffix"),
        (r#"{"prompt": "a", "best_of": 3}"#, "best_of"),
    ] {
        let (r, _): (CompletionRequest, Value) = parse(body.as_bytes()).unwrap();
        assert_eq!(r.prompt().unwrap_err().param.as_deref(), Some(param), "{body}");
    }
    let (r, _): (CompletionRequest, Value) =
        parse(br#"{"prompt": "a", "echo": false, "suffix": "", "best_of": 1}"#).unwrap();
    assert_eq!(r.prompt().unwrap(), "a");
}

#[test]
fn responses_have_openais_shape() {
    let head = Head { id: "chatcmpl-1".into(), created: 7, model: "m".into() };
    let v = chat_completion(&head, vec![chat_choice(0, "hi", "stop", Value::Null)], usage(3, 0, 1));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "hi");
    assert_eq!(v["usage"]["total_tokens"], 4);
    let c = chat_chunk(&head, vec![chat_delta(0, json!({"content": "x"}), None, Value::Null)], None);
    assert_eq!(c["object"], "chat.completion.chunk");
    assert!(c["choices"][0]["finish_reason"].is_null());
    let u = chat_chunk(&head, Vec::new(), Some(usage(1, 0, 2)));
    assert_eq!(u["choices"], json!([]));
    let t = text_completion(&head, vec![text_choice(0, "x", Some("length"), Value::Null)], None);
    assert_eq!(
        (t["object"].as_str(), t["choices"][0]["finish_reason"].as_str()),
        (Some("text_completion"), Some("length"))
    );
}
