// SPDX-License-Identifier: EUPL-1.2
//! Chat templates: real model templates (ChatML, Qwen 3, Gemma 3, Llama 3.1 style) rendered as
//! `transformers` renders them, the built-in fallbacks, errors from broken templates, and one BOS
//! after encoding.

mod text_common;

use inference_core::Message;
use mlx_metal::Error;
use mlx_metal::chat::{BuiltinTemplate, ChatTemplate, TemplateOrigin};
use mlx_metal::tokenizer::Tokenizer;
use serde_json::json;
use text_common::*;

/// Qwen 2's template (ChatML with a default system prompt).
const QWEN2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The conversation part of Qwen 3's template: reversed slices, `namespace`, string methods
/// (`startswith`, `split`, `rstrip`, `lstrip`, `strip`), `loop.last`, `is false`.
const QWEN3: &str = r#"{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "system" %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"#;

/// Gemma 3's template (text part): BOS, system merged into the first user turn, alternation
/// enforced with `raise_exception`.
const GEMMA3: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;

/// The date handling of Llama 3.1's template.
const LLAMA31_DATE: &str = r#"{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Today Date: " + date_string + "<|eot_id|>" }}
"#;

fn conversation() -> Vec<Message> {
    vec![Message::system("Be nice."), Message::user("Hi "), Message::assistant(" Hello!"), Message::user("Bye")]
}

fn gemma_tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let json = spm_json(GEMMA_SPECIALS, Some("<bos>"), SpmStyle::Gemma);
    let dir = model_dir(
        &json,
        &[("tokenizer_config.json", r#"{"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": true}"#)],
    );
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    (dir, tok)
}

fn llama3_tokenizer(config: &str) -> (tempfile::TempDir, Tokenizer) {
    let json = byte_level_json(LLAMA3_SPECIALS, Some("<|begin_of_text|>"));
    let dir = model_dir(&json, &[("tokenizer_config.json", config)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    (dir, tok)
}

const GEMMA_EXPECTED: &str = "<bos><start_of_turn>user\nBe nice.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
                              <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n";

// ---------------------------------------------------------------------------------------------
// Model templates

#[test]
fn renders_the_qwen2_chatml_template() {
    let t = ChatTemplate::new(QWEN2).unwrap();
    assert_eq!(t.origin(), TemplateOrigin::Model);
    assert_eq!(t.source(), QWEN2);
    let text = t.render(&[Message::user("Hi")], true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let text = t.render(&conversation(), false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n Hello!<|im_end|>\n\
         <|im_start|>user\nBye<|im_end|>\n"
    );
}

#[test]
fn renders_the_qwen3_template_with_python_methods() {
    let t = ChatTemplate::new(QWEN3).unwrap();
    let messages = vec![
        Message::system("S"),
        Message::user("Q1"),
        Message::assistant("<think>\nreason\n</think>\n\nA1"),
        Message::user("Q2"),
    ];
    let base = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n\
                <|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(t.render(&messages, true).unwrap(), base);
    let mut extra = serde_json::Map::new();
    extra.insert("enable_thinking".into(), false.into());
    assert_eq!(t.render_with(&messages, true, &extra).unwrap(), format!("{base}<think>\n\n</think>\n\n"));

    // The reasoning of an assistant turn after the last user query is kept.
    let messages = vec![Message::user("Q"), Message::assistant("<think>\nwhy\n</think>\n\nA")];
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nwhy\n</think>\n\nA<|im_end|>\n"
    );
}

#[test]
fn renders_the_gemma3_template_like_the_builtin() {
    let (_dir, tok) = gemma_tokenizer();
    let model = ChatTemplate::new(GEMMA3).unwrap().with_tokens(&tok);
    let builtin = ChatTemplate::builtin(BuiltinTemplate::Gemma3);
    for messages in [conversation(), vec![Message::user("just one")], conversation()[1..].to_vec()] {
        for gen_prompt in [true, false] {
            assert_eq!(model.render(&messages, gen_prompt).unwrap(), builtin.render(&messages, gen_prompt).unwrap());
        }
    }
    assert_eq!(model.render(&conversation(), true).unwrap(), GEMMA_EXPECTED);
}

#[test]
fn raise_exception_in_a_template_is_an_error_with_its_message() {
    let (_dir, tok) = gemma_tokenizer();
    let t = ChatTemplate::new(GEMMA3).unwrap().with_tokens(&tok);
    let bad = [Message::user("a"), Message::user("b")];
    for t in [t, ChatTemplate::builtin(BuiltinTemplate::Gemma3)] {
        let err = t.render(&bad, true).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { op: "ChatTemplate::render", .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("Conversation roles must alternate user/assistant/user/assistant/..."), "{msg}");
        assert!(msg.contains("raised an error"), "{msg}");
    }
}

#[test]
fn strftime_now_and_date_string_work() {
    let (_dir, tok) = llama3_tokenizer(r#"{"bos_token": "<|begin_of_text|>"}"#);
    let t = ChatTemplate::new(LLAMA31_DATE).unwrap().with_tokens(&tok);
    let mut extra = serde_json::Map::new();
    extra.insert("date_string".into(), "01 Jan 2030".into());
    assert_eq!(
        t.render_with(&[], true, &extra).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: 01 Jan 2030<|eot_id|>"
    );
    let today = t.render(&[], true).unwrap();
    let date = today.trim_end_matches("<|eot_id|>").rsplit("Today Date: ").next().unwrap().to_string();
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 3, "{date}");
    assert!(parts[0].len() == 2 && parts[0].chars().all(|c| c.is_ascii_digit()), "{date}");
    assert!(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"].contains(&parts[1]),
        "{date}"
    );
    assert!(parts[2].parse::<u32>().unwrap() >= 2025, "{date}");
}

#[test]
fn python_isms_that_hf_templates_use_work() {
    let t = ChatTemplate::new(concat!(
        "{% for m in messages %}",
        "{{ m['content'].strip() }}|{{ m.content.startswith('  x') }}|{{ m.role.title() }}|{{ m.content|trim }}|",
        "{{ m.get('missing', 'dflt') }}|{{ m.content.split()|join(',') }}|{% if loop.last %}LAST{% endif %}\n",
        "{% endfor %}",
        "{% for k, v in messages[0].items() %}{{ k }}={{ v|trim }};{% endfor %}\n",
        "{{ messages|selectattr('role', 'equalto', 'user')|list|length }}\n",
        "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}\n",
        "{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }} {{ eos_token }}"
    ))
    .unwrap()
    .with_token("eos_token", "</s>");
    let text = t.render(&[Message::user("  x y  "), Message::assistant("z")], true).unwrap();
    // As in Jinja2: booleans print as Python's, and trim_blocks eats the newline after a block tag.
    assert_eq!(
        text,
        "x y|True|User|x y|dflt|x,y|z|False|Assistant|z|dflt|z|LASTrole=user;content=x y;1\nuserTrue True True </s>"
    );
}

#[test]
fn tojson_writes_what_python_json_dumps_writes() {
    let t = ChatTemplate::new(concat!(
        "{{ x|tojson }}\n{{ x|tojson(indent=2) }}\n{{ s|tojson(ensure_ascii=true) }}\n{{ {}|tojson }}{{ []|tojson }}\n",
        "{{ {'z': 1, 'y': 2}|tojson }} {{ {'z': 1, 'y': 2}|tojson(sort_keys=true) }} ",
        "{{ [1, 2]|tojson(separators=(',', ':')) }} {{ 'x'|tojson(indent='\t') }}",
    ))
    .unwrap();
    let mut extra = serde_json::Map::new();
    extra.insert("x".into(), json!({"a": [1.5, "é\"\n<&>", null, true, 1e16, 2.0], "b": 1}));
    extra.insert("s".into(), json!("é😀\u{1}"));
    let text = t.render_with(&[], false, &extra).unwrap();
    let expected = concat!(
        "{\"a\": [1.5, \"é\\\"\\n<&>\", null, true, 1e+16, 2.0], \"b\": 1}\n",
        "{\n  \"a\": [\n    1.5,\n    \"é\\\"\\n<&>\",\n    null,\n    true,\n    1e+16,\n    2.0\n  ],\n  \"b\": 1\n}\n",
        "\"\\u00e9\\ud83d\\ude00\\u0001\"\n",
        "{}[]\n",
        "{\"z\": 1, \"y\": 2} {\"y\": 2, \"z\": 1} [1,2] \"x\"",
    );
    assert_eq!(text, expected);
}

/// Compiles `source` and renders `messages` with it, without the generation prompt.
fn render(source: &str, messages: &[Message]) -> String {
    ChatTemplate::new(source).unwrap().render(messages, false).unwrap()
}

#[test]
fn generation_tags_are_accepted() {
    let source = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
    assert_eq!(render(source, &[Message::user("a"), Message::assistant("b")]), "ab");
}

#[test]
fn trim_blocks_and_lstrip_blocks_are_on() {
    let source = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
    // Like Jinja2 with trim_blocks/lstrip_blocks: block lines vanish; the final newline of the
    // source is dropped (keep_trailing_newline is off).
    assert_eq!(render(source, &[Message::user("a"), Message::user("b")]), "a\nb\n");
}

// ---------------------------------------------------------------------------------------------
// Broken templates

#[test]
fn malformed_templates_are_errors_not_panics() {
    for source in
        ["{% if %}", "{% for m in messages %}", "{{ unclosed", "{% endfor %}", "{% generation %}", "{{ 1 + }}"]
    {
        let err = ChatTemplate::new(source).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { op: "ChatTemplate::new", .. }), "{source}: {err:?}");
        assert!(err.to_string().contains("does not compile"), "{source}: {err}");
    }
}

#[test]
fn deeply_nested_templates_do_not_overflow_the_stack() {
    let depth = 20_000;
    let sources = [
        format!("{{{{ {}1{} }}}}", "(".repeat(depth), ")".repeat(depth)),
        format!("{{{{ {}{} }}}}", "[".repeat(depth), "]".repeat(depth)),
        format!("{}x{}", "{% if true %}".repeat(depth), "{% endif %}".repeat(depth)),
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".to_string(),
    ];
    for source in &sources {
        // Either outcome is fine; what matters is an answer instead of a crash.
        if let Ok(t) = ChatTemplate::new(source) {
            let _ = t.render(&[Message::user("hi")], true);
        }
    }
    let t = ChatTemplate::new(&sources[3]).unwrap();
    assert!(t.render(&[], false).is_err(), "endless recursion is an error");
}

#[test]
fn render_failures_are_errors_with_the_template_message() {
    let cases = [
        ("{{ messages[0].content.nope.deeper }}", "undefined"),
        ("{{ messages|nosuchfilter }}", "nosuchfilter"),
        ("{{ nosuchfunction() }}", "nosuchfunction"),
        ("{{ 'a' + 1 }}", "invalid operation"),
        ("{{ x|tojson }}", "undefined"),
        ("{{ messages.nosuchmethod() }}", "nosuchmethod"),
        ("{{ raise_exception('custom failure') }}", "custom failure"),
    ];
    for (source, needle) in cases {
        let result = ChatTemplate::new(source).and_then(|t| t.render(&[Message::user("hi")], true));
        let err = result.unwrap_err();
        let msg = err.to_string();
        assert!(msg.to_lowercase().contains(needle), "{source}: {msg}");
    }
}

#[test]
fn a_broken_model_template_is_reported_not_replaced() {
    let (_dir, tok) = llama3_tokenizer(r#"{"chat_template": "{% if %}"}"#);
    let err = ChatTemplate::for_model(&tok, "llama").unwrap_err();
    assert!(err.to_string().contains("does not compile"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Built-in templates

#[test]
fn builtin_gemma3_merges_the_system_prompt() {
    let t = ChatTemplate::builtin(BuiltinTemplate::Gemma3);
    assert_eq!(t.origin(), TemplateOrigin::Builtin(BuiltinTemplate::Gemma3));
    assert_eq!(t.render(&conversation(), true).unwrap(), GEMMA_EXPECTED);
    assert_eq!(t.render(&[], true).unwrap(), "<bos><start_of_turn>model\n");
    assert_eq!(t.render(&[Message::system("only")], false).unwrap(), "<bos>");
}

#[test]
fn builtin_chatml() {
    let t = ChatTemplate::builtin(BuiltinTemplate::ChatMl);
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n Hello!<|im_end|>\n\
         <|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(t.render(&[Message::new("tool", "42")], false).unwrap(), "<|im_start|>tool\n42<|im_end|>\n");
}

#[test]
fn builtin_llama3() {
    let t = ChatTemplate::builtin(BuiltinTemplate::Llama3);
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe nice.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    assert_eq!(t.render(&[], false).unwrap(), "<|begin_of_text|>");
}

#[test]
fn builtin_plain() {
    let t = ChatTemplate::builtin(BuiltinTemplate::Plain);
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        "system: Be nice.\nuser: Hi \nassistant:  Hello!\nuser: Bye\nassistant: "
    );
    assert_eq!(BuiltinTemplate::Plain.to_string(), "plain");
    for kind in [BuiltinTemplate::Gemma3, BuiltinTemplate::ChatMl, BuiltinTemplate::Llama3, BuiltinTemplate::Plain] {
        assert_eq!(ChatTemplate::builtin(kind).source(), kind.source());
        assert!(!kind.name().is_empty());
    }
}

#[test]
fn for_model_picks_a_builtin_only_without_a_model_template() {
    let llama3 = byte_level_json(LLAMA3_SPECIALS, Some("<|begin_of_text|>"));
    let qwen = byte_level_json(QWEN_SPECIALS, None);
    let llama2 = spm_json(LLAMA2_SPECIALS, Some("<s>"), SpmStyle::Llama2);
    let gemma = spm_json(GEMMA_SPECIALS, Some("<bos>"), SpmStyle::Gemma);
    let cases: &[(&str, &str, BuiltinTemplate)] = &[
        (&gemma, "gemma3", BuiltinTemplate::Gemma3),
        (&gemma, "gemma3_text", BuiltinTemplate::Gemma3),
        (&gemma, "gemma2", BuiltinTemplate::Gemma3),
        (&qwen, "qwen2", BuiltinTemplate::ChatMl),
        (&qwen, "qwen3", BuiltinTemplate::ChatMl),
        (&llama3, "llama", BuiltinTemplate::Llama3),
        (&qwen, "llama", BuiltinTemplate::ChatMl),
        (&llama2, "llama", BuiltinTemplate::Plain),
        (&llama2, "mistral", BuiltinTemplate::Plain),
        (&llama3, "", BuiltinTemplate::Llama3),
    ];
    for (json, model_type, want) in cases {
        let dir = model_dir(json, &[]);
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let t = ChatTemplate::for_model(&tok, model_type).unwrap();
        assert_eq!(t.origin(), TemplateOrigin::Builtin(*want), "{model_type}");
        assert_eq!(BuiltinTemplate::for_model(&tok, model_type), *want);
    }

    let (_dir, tok) = llama3_tokenizer(&json!({"chat_template": QWEN2}).to_string());
    let t = ChatTemplate::for_model(&tok, "gemma3").unwrap();
    assert_eq!(t.origin(), TemplateOrigin::Model, "the model's own template wins over the model type");
    assert_eq!(t.source(), QWEN2);
}

// ---------------------------------------------------------------------------------------------
// Render and encode: one BOS

#[test]
fn render_and_encode_gives_one_bos() {
    let (_dir, tok) = gemma_tokenizer();
    let bos = tok.bos_id().unwrap();
    let t = ChatTemplate::for_model(&tok, "gemma3").unwrap();
    let ids = t.render_and_encode(&tok, &conversation()).unwrap();
    assert_eq!(ids[0], bos);
    assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1);
    assert_eq!(ids, tok.encode(GEMMA_EXPECTED, false).unwrap());
    let start = tok.token_to_id("<start_of_turn>").unwrap();
    assert_eq!(ids[1], start);

    let (_dir, tok) = llama3_tokenizer(r#"{"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}"#);
    let bos = tok.bos_id().unwrap();
    let t = ChatTemplate::for_model(&tok, "llama").unwrap();
    let ids = t.render_and_encode(&tok, &conversation()).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1);
    assert_eq!(ids[0], bos);

    // A model template that writes {{ bos_token }}.
    let cfg = json!({"bos_token": "<|begin_of_text|>", "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"});
    let (_dir, tok) = llama3_tokenizer(&cfg.to_string());
    let t = ChatTemplate::for_model(&tok, "llama").unwrap();
    let ids = t.render_and_encode(&tok, &[Message::user("hi")]).unwrap();
    assert_eq!(ids, tok.encode("<|begin_of_text|>hi", false).unwrap());

    // A template without a BOS gets the tokeniser's.
    let cfg = json!({"bos_token": "<|begin_of_text|>", "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"});
    let (_dir, tok) = llama3_tokenizer(&cfg.to_string());
    let t = ChatTemplate::for_model(&tok, "llama").unwrap();
    let ids = t.render_and_encode(&tok, &[Message::user("hi")]).unwrap();
    assert_eq!(ids, tok.encode("<|begin_of_text|>hi", false).unwrap());
}

#[test]
fn with_tokens_sets_every_special_token_variable() {
    let json = spm_json(LLAMA2_SPECIALS, Some("<s>"), SpmStyle::Llama2);
    let dir = model_dir(
        &json,
        &[(
            "tokenizer_config.json",
            r#"{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}"#,
        )],
    );
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let t =
        ChatTemplate::new("{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}").unwrap().with_tokens(&tok);
    assert_eq!(t.render(&[], false).unwrap(), "<s>|</s>|<unk>|<unk>");
    let t = t.with_token("eos_token", "<end>");
    assert_eq!(t.render(&[], false).unwrap(), "<s>|<end>|<unk>|<unk>");
    let copy = t.clone();
    assert_eq!(copy.render(&[], false).unwrap(), "<s>|<end>|<unk>|<unk>");
    assert!(format!("{copy:?}").contains("ChatTemplate"));
}
