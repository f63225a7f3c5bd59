// SPDX-License-Identifier: EUPL-1.2
//! Small tokenisers written as `tokenizer.json` literals for the text tests: a byte-level BPE
//! (GPT-2 / Llama 3 style, with Llama 3's split regex) and SentencePiece-style BPEs with byte
//! fallback (Llama 2's normaliser and decoder, a `Metaspace` pre-tokeniser and decoder, and
//! Gemma's), plus model directories around them and a corpus of awkward text.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::Path;

use mlx_metal::tokenizer::{StreamDecoder, Tokenizer};
use serde_json::{Value, json};

/// Text that tokenisers get wrong: emoji (with ZWJ and flags), CJK, accents (precomposed and
/// combining), runs of spaces and newlines, tabs, a literal U+FFFD, control characters.
pub const CORPUS: &[&str] = &[
    "Hello world",
    "the quick brown fox is in the other world",
    "hello hello, hello! the world",
    "I ❤️ Rust 🦀 and 😀😀",
    "family: 👨‍👩‍👧‍👦 and 🏳️‍🌈 done",
    "flags 🇬🇧🇫🇷",
    "你好，世界。日本語のテキスト",
    "café naïve résumé Ångström",
    "e\u{301} combining",
    "a  b   c    d",
    "line one\n\nline three\n\n\n\nend",
    "tabs\tand\t\tmore",
    "  leading spaces",
    "trailing spaces   ",
    " ",
    "\n",
    "",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "∑ ∫ √ ≠ ≤",
    "literal \u{FFFD} replacement",
    "nul \u{0} and bell \u{7}",
    "numbers 1234567 and 3.14159",
    "it's they're we've",
];

/// The GPT-2 byte → character table (bytes that are printable stand for themselves).
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        table[usize::from(b)] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap();
            next += 1;
            c
        };
    }
    table
}

fn byte_level(bytes: &[u8]) -> String {
    let table = byte_to_char();
    bytes.iter().map(|&b| table[usize::from(b)]).collect()
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn added_tokens(specials: &[&str], first_id: usize) -> Vec<Value> {
    specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": first_id + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect()
}

fn bos_processor(bos: &str, id: usize) -> Value {
    json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}}
    })
}

/// A byte-level BPE (Llama 3 style): the 256 byte symbols, merges for common English, for runs
/// of spaces and newlines and for the lead bytes of emoji and CJK (so characters split across
/// tokens at odd places), then `specials` as added special tokens. With `bos`, the
/// post-processor prepends it.
pub fn byte_level_json(specials: &[&str], bos: Option<&str>) -> String {
    let merges: &[(&[u8], &[u8])] = &[
        (b" ", b"t"),
        (b"h", b"e"),
        (b" t", b"he"),
        (b"i", b"n"),
        (b" ", b"a"),
        (b"e", b"r"),
        (b"o", b"n"),
        (b"r", b"e"),
        (b" ", b"w"),
        (b"o", b"r"),
        (b" w", b"or"),
        (b"l", b"d"),
        (b" wor", b"ld"),
        (b"l", b"l"),
        (b"H", b"e"),
        (b"He", b"ll"),
        (b"Hell", b"o"),
        (b"h", b"e"),
        (b"he", b"ll"),
        (b"hell", b"o"),
        (b" ", b"hello"),
        (b" ", b" "),
        (b"  ", b"  "),
        (b"\n", b"\n"),
        (b"\xF0", b"\x9F"),
        (b"\xF0\x9F", b"\x98"),
        (b"\xF0\x9F", b"\xA6"),
        (b"\xE4", b"\xBD"),
        (b"\xC3", b"\xA9"),
        (b"\xE2", b"\x80"),
        (b"\xE2\x80", b"\x8D"),
    ];
    let table = byte_to_char();
    let mut vocab: BTreeMap<String, usize> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for c in table {
        order.push(c.to_string());
    }
    let mut merge_list = Vec::new();
    for (a, b) in merges {
        let (a, b) = (byte_level(a), byte_level(b));
        let joined = format!("{a}{b}");
        if order.contains(&joined) {
            continue;
        }
        assert!(order.contains(&a) && order.contains(&b), "merge parts must exist: {a:?} {b:?}");
        order.push(joined);
        merge_list.push(json!([a, b]));
    }
    for (i, t) in order.iter().enumerate() {
        vocab.insert(t.clone(), i);
    }
    let first_special = order.len();
    let post = match bos {
        Some(bos) => bos_processor(bos, first_special + specials.iter().position(|s| *s == bos).unwrap()),
        None => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(specials, first_special),
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab, "merges": merge_list}
    })
    .to_string()
}

/// How a SentencePiece-style tokeniser handles spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmStyle {
    /// Llama 2: normaliser `Prepend("▁")` + `Replace(" ", "▁")`; decoder `Replace`,
    /// `ByteFallback`, `Fuse`, `Strip(1, 0)`.
    Llama2,
    /// A `Metaspace` pre-tokeniser and decoder with `prepend_scheme: first`.
    Metaspace,
    /// Gemma: normaliser `Replace(" ", "▁")` (no prefix space); decoder `Replace`,
    /// `ByteFallback`, `Fuse`.
    Gemma,
}

/// A SentencePiece-style BPE with byte fallback: `specials` first (they must include `<unk>`),
/// then `<0x00>`…`<0xFF>`, then single characters (ASCII letters, digits, some punctuation,
/// `▁`, `é`) and merged pieces. Every other character falls back to bytes.
pub fn spm_json(specials: &[&str], bos: Option<&str>, style: SpmStyle) -> String {
    assert!(specials.contains(&"<unk>"));
    let merges: &[(&str, &str)] = &[
        ("▁", "t"),
        ("h", "e"),
        ("▁t", "he"),
        ("i", "n"),
        ("▁", "a"),
        ("e", "r"),
        ("o", "n"),
        ("r", "e"),
        ("▁", "w"),
        ("o", "r"),
        ("▁w", "or"),
        ("l", "d"),
        ("▁wor", "ld"),
        ("l", "l"),
        ("▁", "h"),
        ("e", "ll"),
        ("▁h", "ell"),
        ("▁hell", "o"),
        ("H", "ell"),
        ("Hell", "o"),
        ("i", "s"),
        ("▁", "i"),
        ("▁i", "s"),
        ("▁", "▁"),
        ("▁▁", "▁▁"),
        ("c", "a"),
        ("ca", "f"),
        ("caf", "é"),
    ];
    let mut order: Vec<String> = specials.iter().map(ToString::to_string).collect();
    for b in 0..=255u8 {
        order.push(format!("<0x{b:02X}>"));
    }
    let singles = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'é";
    for c in singles.chars() {
        order.push(c.to_string());
    }
    let mut merge_list = Vec::new();
    for (a, b) in merges {
        let joined = format!("{a}{b}");
        assert!(order.iter().any(|t| t == a) && order.iter().any(|t| t == b), "merge parts must exist: {a} {b}");
        if !order.contains(&joined) {
            order.push(joined);
        }
        merge_list.push(json!([a, b]));
    }
    let vocab: BTreeMap<String, usize> = order.iter().enumerate().map(|(i, t)| (t.clone(), i)).collect();
    let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let (normalizer, pre_tokenizer, decoder) = match style {
        SpmStyle::Llama2 => (
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace(" ", "▁")]}),
            Value::Null,
            json!({"type": "Sequence", "decoders": [replace("▁", " "), {"type": "ByteFallback"}, {"type": "Fuse"},
                   {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        ),
        SpmStyle::Metaspace => (
            Value::Null,
            json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}),
            json!({"type": "Sequence", "decoders": [{"type": "ByteFallback"},
                   {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}]}),
        ),
        SpmStyle::Gemma => (
            replace(" ", "▁"),
            Value::Null,
            json!({"type": "Sequence", "decoders": [replace("▁", " "), {"type": "ByteFallback"}, {"type": "Fuse"}]}),
        ),
    };
    let post = match bos {
        Some(bos) => bos_processor(bos, specials.iter().position(|s| *s == bos).unwrap()),
        None => Value::Null,
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(specials, 0),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merge_list}
    })
    .to_string()
}

/// Llama 3's special tokens (the first is the BOS).
pub const LLAMA3_SPECIALS: &[&str] =
    &["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"];
/// Qwen's special tokens.
pub const QWEN_SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Llama 2's special tokens.
pub const LLAMA2_SPECIALS: &[&str] = &["<unk>", "<s>", "</s>"];
/// Gemma's special tokens.
pub const GEMMA_SPECIALS: &[&str] = &["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"];

/// Writes `files` (name → contents) into `dir`.
pub fn write_dir(dir: &Path, files: &[(&str, &str)]) {
    for (name, contents) in files {
        std::fs::write(dir.join(name), contents).unwrap();
    }
}

/// A temporary model directory with `tokenizer.json` and the other files given.
pub fn model_dir(tokenizer_json: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &[("tokenizer.json", tokenizer_json)]);
    write_dir(dir.path(), files);
    dir
}

/// A loaded tokeniser with a name, for table-driven tests.
pub struct Fixture {
    pub name: &'static str,
    pub tokenizer: Tokenizer,
    pub dir: tempfile::TempDir,
}

/// Every fixture tokeniser: byte-level (Llama 3, Qwen), Llama 2, Metaspace and Gemma styles.
pub fn fixtures() -> Vec<Fixture> {
    let cases: Vec<(&'static str, String)> = vec![
        ("byte-level-llama3", byte_level_json(LLAMA3_SPECIALS, Some("<|begin_of_text|>"))),
        ("byte-level-qwen", byte_level_json(QWEN_SPECIALS, None)),
        ("spm-llama2", spm_json(LLAMA2_SPECIALS, Some("<s>"), SpmStyle::Llama2)),
        ("spm-metaspace", spm_json(LLAMA2_SPECIALS, Some("<s>"), SpmStyle::Metaspace)),
        ("spm-gemma", spm_json(GEMMA_SPECIALS, Some("<bos>"), SpmStyle::Gemma)),
    ];
    cases
        .into_iter()
        .map(|(name, json)| {
            let dir = model_dir(&json, &[]);
            let tokenizer = Tokenizer::from_dir(dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
            Fixture { name, tokenizer, dir }
        })
        .collect()
}

/// Streams `ids` one at a time and returns the pieces (the last from `finish`).
pub fn stream_pieces(decoder: &mut StreamDecoder, ids: &[u32]) -> Vec<String> {
    let mut pieces: Vec<String> = ids.iter().map(|&id| decoder.push(id).unwrap()).collect();
    pieces.push(decoder.finish().unwrap());
    pieces
}

/// Streams `ids` and returns the concatenated text.
pub fn stream_text(tokenizer: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> String {
    stream_pieces(&mut tokenizer.stream_decoder(skip_special_tokens), ids).concat()
}

/// The byte of a SentencePiece byte-fallback token (`<0xE2>` → 0xE2).
pub fn byte_value(tokenizer: &Tokenizer, id: u32) -> Option<u8> {
    let token = tokenizer.id_to_token(id)?;
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() == 2 { u8::from_str_radix(hex, 16).ok() } else { None }
}

/// `ids` without byte-fallback tokens that cut a character: leading continuation bytes and a
/// trailing unfinished sequence. Hugging Face's `ByteFallback` decoder replaces a whole run of
/// byte tokens with U+FFFD when any of it is invalid, valid characters included; a stream that
/// has already emitted those characters cannot take them back, so the stream matches `decode`
/// exactly on slices of whole characters (and on anything a byte-level tokeniser gives).
pub fn whole_characters<'a>(tokenizer: &Tokenizer, ids: &'a [u32]) -> &'a [u32] {
    let mut start = 0;
    while start < ids.len() && byte_value(tokenizer, ids[start]).is_some_and(|b| (0x80..0xC0).contains(&b)) {
        start += 1;
    }
    let mut end = ids.len();
    let mut run_start = end;
    while run_start > start && byte_value(tokenizer, ids[run_start - 1]).is_some() {
        run_start -= 1;
    }
    let bytes: Vec<u8> = ids[run_start..end].iter().filter_map(|&id| byte_value(tokenizer, id)).collect();
    if let Err(e) = std::str::from_utf8(&bytes)
        && e.error_len().is_none()
    {
        end = run_start + e.valid_up_to();
    }
    &ids[start..end]
}
