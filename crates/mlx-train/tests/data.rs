// SPDX-License-Identifier: EUPL-1.2
//! Datasets: the three formats, prompt masking, mlx-lm's batching, and bad
//! files (bad JSON, empty, wrong keys, too long) failing with file and line.

mod common;

use std::path::Path;

use mlx_metal::chat::ChatTemplate;
use mlx_metal::tokenizer::Tokenizer;
use mlx_train::{DataConfig, Dataset, Encoder, Error, Format};

fn encoding() -> (Tokenizer, ChatTemplate) {
    let dir = common::tiny("gemma3-tiny");
    mlx_train::load_encoding(&dir, "gemma3_text").expect("the fixture's tokeniser")
}

fn parse(text: &str, cfg: &DataConfig) -> Result<Dataset, Error> {
    let (tok, template) = encoding();
    Dataset::parse(Path::new("data/train.jsonl"), text, &Encoder { tokenizer: &tok, template: &template }, cfg)
}

fn err(text: &str, cfg: &DataConfig) -> (Option<usize>, String) {
    match parse(text, cfg) {
        Err(Error::Data { line, message, .. }) => (line, message),
        other => panic!("expected a data error, got {other:?}"),
    }
}

#[test]
fn reads_the_three_formats_as_mlx_lm_tokenises_them() {
    let (tok, template) = encoding();
    let cfg = DataConfig::default();
    let text = parse("{\"text\": \"hello world\"}\n\n{\"text\": \"a b c\"}\n", &cfg).unwrap();
    assert_eq!(text.format, Format::Text);
    assert_eq!(text.len(), 2, "blank lines are skipped");
    assert_eq!(text.examples[1].line, 3);
    let mut ids = tok.encode("hello world", true).unwrap();
    let eos = tok.token_to_id(tok.eos_token().unwrap()).unwrap();
    ids.push(eos);
    assert_eq!(text.examples[0].tokens, ids, "text: encoded with special tokens, ended with EOS");

    let pc = parse(r#"{"prompt": "Hi?", "completion": "Hello."}"#, &cfg).unwrap();
    assert_eq!(pc.format, Format::Completions);
    let msgs = [inference_core::Message::new("user", "Hi?"), inference_core::Message::new("assistant", "Hello.")];
    let rendered = template.render(&msgs, false).unwrap();
    assert_eq!(pc.examples[0].tokens, tok.encode(&rendered, false).unwrap());
    assert_eq!(pc.examples[0].offset, 0, "no masking unless asked");

    let chat = parse(
        r#"{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}"#,
        &cfg,
    )
    .unwrap();
    assert_eq!(chat.format, Format::Chat);
    assert_eq!(chat.examples[0].tokens, pc.examples[0].tokens);
}

#[test]
fn mask_prompt_offsets_the_loss_past_the_prompt() {
    let (tok, template) = encoding();
    let cfg = DataConfig { mask_prompt: true, ..DataConfig::default() };
    let pc = parse(r#"{"prompt": "Hi?", "completion": "Hello."}"#, &cfg).unwrap();
    let prompt = template.render(&[inference_core::Message::new("user", "Hi?")], true).unwrap();
    let offset = tok.encode(&prompt, false).unwrap().len();
    assert_eq!(pc.examples[0].offset, offset);
    assert!(offset > 0 && offset < pc.examples[0].tokens.len());
    let chat = parse(
        r#"{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}"#,
        &cfg,
    )
    .unwrap();
    assert_eq!(chat.examples[0].offset, offset);
    let (line, msg) = err("{\"text\": \"x\"}", &cfg);
    assert_eq!(line, Some(1));
    assert!(msg.contains("mask_prompt"), "{msg}");
}

#[test]
fn bad_files_fail_with_the_line() {
    let cfg = DataConfig::default();
    let (line, msg) = err("{\"text\": \"ok\"}\n{\"text\": \"broken\"\n", &cfg);
    assert_eq!(line, Some(2));
    assert!(msg.contains("invalid JSON"), "{msg}");

    let (line, msg) = err("", &cfg);
    assert_eq!(line, None);
    assert!(msg.contains("no records"), "{msg}");
    let (_, msg) = err("\n  \n", &cfg);
    assert!(msg.contains("no records"), "{msg}");

    let (line, msg) = err("{\"question\": \"x\", \"answer\": \"y\"}", &cfg);
    assert_eq!(line, Some(1));
    assert!(msg.contains("unknown record format") && msg.contains("question"), "{msg}");

    let (line, msg) = err("{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n", &cfg);
    assert_eq!(line, Some(2));
    assert!(msg.contains("missing key \"completion\""), "{msg}");

    let (line, msg) = err("{\"text\": \"a\"}\n{\"text\": 5}\n", &cfg);
    assert_eq!(line, Some(2));
    assert!(msg.contains("must be a string"), "{msg}");

    let (line, msg) = err("[1, 2]", &cfg);
    assert_eq!(line, Some(1));
    assert!(msg.contains("JSON object"), "{msg}");

    let (line, msg) = err(r#"{"messages": [{"role": "user"}]}"#, &cfg);
    assert_eq!(line, Some(1));
    assert!(msg.contains("messages[0]") && msg.contains("content"), "{msg}");

    // The full error message names the file and line.
    let e = parse("{\"text\": \"ok\"}\nnot json\n", &cfg).unwrap_err().to_string();
    assert!(e.starts_with("data/train.jsonl:2: invalid JSON"), "{e}");
}

#[test]
fn sequences_longer_than_the_limit_are_errors_unless_truncated() {
    let long = format!("{{\"text\": \"{}\"}}", "word ".repeat(40));
    let text = format!("{{\"text\": \"short\"}}\n{long}\n");
    let cfg = DataConfig { max_seq_length: 16, ..DataConfig::default() };
    let (line, msg) = err(&text, &cfg);
    assert_eq!(line, Some(2));
    assert!(msg.contains("more than max_seq_length = 16"), "{msg}");
    let ds = parse(&text, &DataConfig { truncate: true, ..cfg }).unwrap();
    assert_eq!(ds.examples[1].tokens.len(), 16);
}

#[test]
fn batches_are_sorted_by_length_and_padded_as_mlx_lm_pads() {
    let lines = [
        "{\"text\": \"a b c d e f g h\"}",
        "{\"text\": \"a\"}",
        "{\"text\": \"a b c\"}",
        "{\"text\": \"a b\"}",
        "{\"text\": \"x\"}",
    ];
    let ds = parse(&lines.join("\n"), &DataConfig::default()).unwrap();
    let idx = ds.batch_indices(2).unwrap();
    assert_eq!(idx.len(), 2, "the last short batch is dropped");
    let lens: Vec<usize> = idx.iter().flatten().map(|&i| ds.examples[i].tokens.len()).collect();
    assert!(lens.windows(2).all(|w| w[0] <= w[1]), "sorted by length: {lens:?}");
    let batch = ds.batch(&idx[1], 2048).unwrap();
    assert_eq!(batch.tokens.shape(), [2, 33], "one plus the next multiple of 32");
    let lengths = batch.lengths.to_vec::<i32>().unwrap();
    assert_eq!(lengths[1] as usize, ds.examples[idx[1][0]].tokens.len());
    let tokens = batch.tokens_i32().unwrap();
    assert!(tokens[lengths[1] as usize..33].iter().all(|&t| t == 0), "padded with 0");
    assert_eq!(ds.batch(&idx[1], 8).unwrap().tokens.shape(), [2, 8], "capped at max_seq_length");
    assert!(ds.batch_indices(6).is_err(), "fewer records than the batch size");
    assert!(ds.batch_indices(0).is_err());
    assert!(ds.batch(&[99], 64).is_err());
}
