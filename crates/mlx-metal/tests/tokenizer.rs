// SPDX-License-Identifier: EUPL-1.2
//! The tokeniser: loading a model directory, encode/decode round trips, the EOS union, one BOS,
//! streaming detokenisation and stop strings.

mod text_common;

use mlx_metal::Error;
use mlx_metal::tokenizer::{StopChunk, StopMatcher, Tokenizer};
use proptest::prelude::*;
use text_common::*;

// ---------------------------------------------------------------------------------------------
// Encode and decode

#[test]
fn round_trips_the_corpus_on_every_fixture() {
    for f in fixtures() {
        for &text in CORPUS {
            let ids = f.tokenizer.encode(text, false).unwrap();
            let back = f.tokenizer.decode(&ids, false).unwrap();
            // A Metaspace pre-tokeniser does not prepend `▁` to text that starts with a space, and
            // its decoder drops every `▁` of the first token: Hugging Face loses leading spaces.
            let expected = if f.name == "spm-metaspace" { text.trim_start_matches(' ') } else { text };
            assert_eq!(back, expected, "{}: {text:?} → {ids:?}", f.name);

            let with_special = f.tokenizer.encode(text, true).unwrap();
            assert_eq!(f.tokenizer.decode(&with_special, true).unwrap(), expected, "{}: {text:?}", f.name);
        }
    }
}

#[test]
fn multibyte_characters_split_across_tokens() {
    let f = &fixtures()[0];
    let tok = &f.tokenizer;
    // No merge covers a whole emoji: "🦀" (F0 9F A6 80) is [F0 9F A6] + [80].
    let ids = tok.encode("🦀", false).unwrap();
    assert!(ids.len() >= 2, "{ids:?}");
    for &id in &ids {
        assert!(tok.decode(&[id], false).unwrap().contains('\u{FFFD}'), "a lone piece of 🦀 is not a character");
    }
    assert_eq!(tok.decode(&ids, false).unwrap(), "🦀");

    let spm = fixtures().into_iter().find(|f| f.name == "spm-llama2").unwrap();
    let ids = spm.tokenizer.encode("€", false).unwrap();
    let tokens: Vec<String> = ids.iter().map(|&id| spm.tokenizer.id_to_token(id).unwrap()).collect();
    assert_eq!(tokens, ["▁", "<0xE2>", "<0x82>", "<0xAC>"]);
}

#[test]
fn special_tokens_in_text_become_their_ids() {
    let f = &fixtures()[0];
    let tok = &f.tokenizer;
    let bos = tok.token_to_id("<|begin_of_text|>").unwrap();
    let eot = tok.token_to_id("<|eot_id|>").unwrap();
    let ids = tok.encode("<|begin_of_text|>hi<|eot_id|>", false).unwrap();
    assert_eq!(ids.first(), Some(&bos));
    assert_eq!(ids.last(), Some(&eot));
    assert!(tok.is_special(bos) && tok.is_special(eot));
    assert!(!tok.is_special(ids[1]));
    assert_eq!(tok.decode(&ids, true).unwrap(), "hi");
    assert_eq!(tok.decode(&ids, false).unwrap(), "<|begin_of_text|>hi<|eot_id|>");
}

#[test]
fn encode_adds_the_post_processor_tokens_only_when_asked() {
    for f in fixtures() {
        let plain = f.tokenizer.encode("Hello world", false).unwrap();
        let special = f.tokenizer.encode("Hello world", true).unwrap();
        if f.name == "byte-level-qwen" {
            assert_eq!(plain, special, "{}", f.name);
        } else {
            assert_eq!(special.len(), plain.len() + 1, "{}", f.name);
            assert_eq!(&special[1..], plain.as_slice(), "{}", f.name);
        }
    }
}

#[test]
fn empty_text_and_unknown_ids_do_not_fail() {
    for f in fixtures() {
        assert_eq!(f.tokenizer.encode("", false).unwrap(), Vec::<u32>::new(), "{}", f.name);
        let vocab = u32::try_from(f.tokenizer.vocab_size()).unwrap();
        let ids = f.tokenizer.encode("Hello", false).unwrap();
        let mut with_junk = vec![vocab, u32::MAX];
        with_junk.extend(&ids);
        assert_eq!(f.tokenizer.decode(&with_junk, false).unwrap(), f.tokenizer.decode(&ids, false).unwrap());
        assert_eq!(f.tokenizer.decode(&[], false).unwrap(), "");
        assert_eq!(f.tokenizer.id_to_token(u32::MAX), None);
        assert_eq!(f.tokenizer.token_to_id("no such token"), None);
        assert!(!f.tokenizer.is_special(u32::MAX));
        assert!(!f.tokenizer.is_eos(u32::MAX));
    }
}

#[test]
fn vocabulary_accessors_agree() {
    let f = &fixtures()[0];
    let tok = &f.tokenizer;
    let n = u32::try_from(tok.vocab_size()).unwrap();
    assert!(n as usize > 256 + LLAMA3_SPECIALS.len());
    for id in 0..n {
        let token = tok.id_to_token(id).unwrap();
        assert_eq!(tok.token_to_id(&token), Some(id));
    }
    assert_eq!(tok.id_to_token(n), None);
    assert_eq!(tok.id_to_token(n - 1).as_deref(), LLAMA3_SPECIALS.last().copied());
    assert_eq!(tok.token_to_id("Ġthe"), Some(tok.encode(" the", false).unwrap()[0]));
    assert_eq!(tok.path(), f.dir.path().join("tokenizer.json"));
    assert!(format!("{tok:?}").contains("vocab_size"));
}

// ---------------------------------------------------------------------------------------------
// Loading and its errors

#[test]
fn a_missing_tokenizer_json_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    let err = Tokenizer::from_file(dir.path().join("nope.json")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("nope.json"), "{err}");
}

#[test]
fn a_malformed_tokenizer_json_is_a_format_error_naming_it() {
    for contents in ["{not json", "[]", "{}", r#"{"model": {"type": "BPE", "vocab": 3}}"#, ""] {
        let dir = model_dir(contents, &[]);
        let err = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{contents:?}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains("tokenizer.json") && msg.contains("not a valid tokenizer.json"), "{msg}");
    }
}

#[test]
fn malformed_optional_files_are_format_errors_naming_them() {
    let json = byte_level_json(LLAMA3_SPECIALS, None);
    let cases: &[(&str, &str, &str)] = &[
        ("tokenizer_config.json", "{oops", "not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", "expected a JSON object"),
        ("tokenizer_config.json", r#"{"eos_token": 5}"#, "`eos_token`"),
        ("tokenizer_config.json", r#"{"bos_token": {"id": 3}}"#, "`bos_token`"),
        ("tokenizer_config.json", r#"{"add_bos_token": "yes"}"#, "`add_bos_token`"),
        ("tokenizer_config.json", r#"{"chat_template": 7}"#, "`chat_template`"),
        ("tokenizer_config.json", r#"{"chat_template": [{"name": "default"}]}"#, "`chat_template`"),
        ("generation_config.json", r#"{"eos_token_id": "2"}"#, "`eos_token_id`"),
        ("generation_config.json", r#"{"eos_token_id": [1, -2]}"#, "`eos_token_id`"),
        ("config.json", r#"{"eos_token_id": 4294967296}"#, "`eos_token_id`"),
        ("config.json", r#"{"text_config": {"bos_token_id": 1.5}}"#, "`bos_token_id`"),
        ("chat_template.json", "nope", "not valid JSON"),
    ];
    for (file, contents, what) in cases {
        let dir = model_dir(&json, &[(file, contents)]);
        let err = Tokenizer::from_dir(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Format { .. }), "{file} {contents}: {err:?}");
        assert!(msg.contains(file) && msg.contains(what), "{file} {contents}: {msg}");
    }
}

#[test]
fn a_panic_inside_the_tokeniser_becomes_an_error() {
    // tokenizers' Strip decoder indexes past the start of a token it strips entirely.
    let mut json: serde_json::Value = serde_json::from_str(&byte_level_json(QWEN_SPECIALS, None)).unwrap();
    json["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [
        {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        {"type": "Strip", "content": " ", "start": 0, "stop": 2}
    ]});
    let dir = model_dir(&json.to_string(), &[]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let space = tok.encode(" ", false).unwrap();
    let err = tok.decode(&space, false).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { op: "Tokenizer::decode", .. }), "{err:?}");
    assert!(err.to_string().contains("panicked"), "{err}");
    let mut stream = tok.stream_decoder(false);
    assert!(stream.push(space[0]).is_err());
    assert!(!stream.has_pending(), "a failed push leaves the decoder as it was");
    assert_eq!(tok.decode(&tok.encode("ab", false).unwrap(), false).unwrap(), "ab");
}

#[test]
fn a_bare_tokenizer_json_has_no_special_token_facts() {
    let dir = model_dir(&byte_level_json(LLAMA3_SPECIALS, Some("<|begin_of_text|>")), &[]);
    let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(tok.bos_id(), None);
    assert_eq!(tok.eos_ids(), &[] as &[u32]);
    assert_eq!(tok.chat_template(), None);
    assert_eq!(tok.bos_token(), None);
    // The post-processor still adds its BOS.
    assert_eq!(tok.encode("hi", true).unwrap()[0], tok.token_to_id("<|begin_of_text|>").unwrap());
}

// ---------------------------------------------------------------------------------------------
// BOS and EOS

#[test]
fn eos_ids_are_the_union_of_every_file_in_order() {
    let json = byte_level_json(LLAMA3_SPECIALS, Some("<|begin_of_text|>"));
    let probe = model_dir(&json, &[]);
    let t = Tokenizer::from_dir(probe.path()).unwrap();
    let id = |s: &str| t.token_to_id(s).unwrap();
    let (eot, eos, bos) = (id("<|eot_id|>"), id("<|end_of_text|>"), id("<|begin_of_text|>"));

    let dir = model_dir(
        &json,
        &[
            (
                "tokenizer_config.json",
                r#"{"eos_token": {"content": "<|eot_id|>", "special": true}, "bos_token": "<|begin_of_text|>"}"#,
            ),
            ("generation_config.json", &format!(r#"{{"eos_token_id": [{eos}, {eot}, 7], "bos_token_id": 3}}"#)),
            ("config.json", &format!(r#"{{"eos_token_id": 8, "text_config": {{"eos_token_id": [9, {eos}]}}}}"#)),
        ],
    );
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_ids(), &[eot, eos, 7, 8, 9]);
    assert!(tok.is_eos(eot) && tok.is_eos(9) && !tok.is_eos(bos));
    assert_eq!(tok.eos_token(), Some("<|eot_id|>"));
    assert_eq!(tok.bos_id(), Some(bos), "the tokenizer_config BOS wins over bos_token_id");
    assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
}

#[test]
fn eos_and_bos_come_from_config_files_alone() {
    let json = byte_level_json(QWEN_SPECIALS, None);
    // Only a nested text_config (as multimodal Gemma 3 has), with an int EOS.
    let dir = model_dir(&json, &[("config.json", r#"{"text_config": {"eos_token_id": 257, "bos_token_id": 256}}"#)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_ids(), &[257]);
    assert_eq!(tok.bos_id(), Some(256));
    // Without a tokenizer_config the texts are the vocabulary's.
    assert_eq!(tok.eos_token().map(str::to_string), tok.id_to_token(257));
    assert_eq!(tok.bos_token().map(str::to_string), tok.id_to_token(256));

    // generation_config's BOS comes before config.json's; nulls are ignored.
    let dir = model_dir(
        &json,
        &[
            ("generation_config.json", r#"{"bos_token_id": 5, "eos_token_id": null}"#),
            ("config.json", r#"{"bos_token_id": 6, "eos_token_id": [1, 1, 2]}"#),
            ("tokenizer_config.json", r#"{"bos_token": null, "eos_token": null}"#),
        ],
    );
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_id(), Some(5));
    assert_eq!(tok.eos_ids(), &[1, 2]);
}

#[test]
fn a_bos_token_outside_the_vocabulary_gives_no_id() {
    let dir =
        model_dir(&byte_level_json(QWEN_SPECIALS, None), &[("tokenizer_config.json", r#"{"bos_token": "<nope>"}"#)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_id(), None);
    assert_eq!(tok.bos_token(), Some("<nope>"));
    assert_eq!(tok.encode_prompt("hi").unwrap(), tok.encode("hi", true).unwrap());
}

#[test]
fn encode_prompt_never_doubles_the_bos() {
    let json = byte_level_json(LLAMA3_SPECIALS, Some("<|begin_of_text|>"));
    let dir = model_dir(
        &json,
        &[("tokenizer_config.json", r#"{"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}"#)],
    );
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let bos = tok.bos_id().unwrap();
    let count = |ids: &[u32]| ids.iter().filter(|&&i| i == bos).count();

    // The original's quirk: encoding a templated prompt with special tokens gives two BOS.
    let templated = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>";
    assert_eq!(count(&tok.encode(templated, true).unwrap()), 2);

    let ids = tok.encode_prompt(templated).unwrap();
    assert_eq!(count(&ids), 1);
    assert_eq!(ids[0], bos);
    assert_eq!(ids, tok.encode(templated, false).unwrap());

    let ids = tok.encode_prompt("plain prompt").unwrap();
    assert_eq!(ids[0], bos);
    assert_eq!(count(&ids), 1);
}

#[test]
fn encode_prompt_follows_add_bos_token() {
    // A post-processor without the BOS, but tokenizer_config asks for it.
    let json = spm_json(GEMMA_SPECIALS, None, SpmStyle::Gemma);
    let dir = model_dir(&json, &[("tokenizer_config.json", r#"{"bos_token": "<bos>", "add_bos_token": true}"#)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let bos = tok.token_to_id("<bos>").unwrap();
    assert_eq!(tok.add_bos_token(), Some(true));
    let ids = tok.encode_prompt("hello").unwrap();
    assert_eq!(ids[0], bos);
    assert_eq!(&ids[1..], tok.encode("hello", false).unwrap().as_slice());
    assert_eq!(tok.encode_prompt("<bos>hello").unwrap(), ids);

    // add_bos_token: false removes the post-processor's BOS.
    let json = spm_json(GEMMA_SPECIALS, Some("<bos>"), SpmStyle::Gemma);
    let dir = model_dir(&json, &[("tokenizer_config.json", r#"{"bos_token": "<bos>", "add_bos_token": false}"#)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.encode("hello", true).unwrap()[0], bos);
    assert_eq!(tok.encode_prompt("hello").unwrap(), tok.encode("hello", false).unwrap());

    // A model without a BOS (Qwen) encodes as encode(text, true).
    let dir =
        model_dir(&byte_level_json(QWEN_SPECIALS, None), &[("tokenizer_config.json", r#"{"add_bos_token": false}"#)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.encode_prompt("<|im_start|>user").unwrap(), tok.encode("<|im_start|>user", true).unwrap());
}

#[test]
fn encode_prompt_drops_a_bos_added_before_one_already_there() {
    // A BOS that absorbs the whitespace before it (`lstrip`): " <bos>hi" does not start with the
    // BOS text, yet encodes to the post-processor's BOS followed by the typed one.
    let mut json: serde_json::Value =
        serde_json::from_str(&spm_json(GEMMA_SPECIALS, Some("<bos>"), SpmStyle::Gemma)).unwrap();
    for token in json["added_tokens"].as_array_mut().unwrap() {
        if token["content"] == "<bos>" {
            token["lstrip"] = true.into();
        }
    }
    let dir = model_dir(&json.to_string(), &[("tokenizer_config.json", r#"{"bos_token": "<bos>"}"#)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let bos = tok.bos_id().unwrap();
    let doubled = tok.encode(" <bos>hi", true).unwrap();
    assert_eq!(&doubled[..2], &[bos, bos]);
    let ids = tok.encode_prompt(" <bos>hi").unwrap();
    assert_eq!(ids, &doubled[1..]);
}

// ---------------------------------------------------------------------------------------------
// Chat templates stored with the tokeniser

#[test]
fn chat_templates_are_read_in_every_form() {
    let json = byte_level_json(QWEN_SPECIALS, None);
    let dir = model_dir(&json, &[("tokenizer_config.json", r#"{"chat_template": "{{ messages }}"}"#)]);
    assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().chat_template(), Some("{{ messages }}"));

    let list = r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
    let dir = model_dir(&json, &[("tokenizer_config.json", list)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.chat_template(), Some("D"));
    assert_eq!(tok.named_chat_template("tool_use"), Some("T"));
    assert_eq!(tok.named_chat_template("rag"), None);

    let dir =
        model_dir(&json, &[("tokenizer_config.json", r#"{"chat_template": [{"name": "tool_use", "template": "T"}]}"#)]);
    assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().chat_template(), None, "no default, no template");

    // chat_template.json and then chat_template.jinja override tokenizer_config.json.
    let dir = model_dir(
        &json,
        &[
            ("tokenizer_config.json", r#"{"chat_template": "old"}"#),
            ("chat_template.json", r#"{"chat_template": "json"}"#),
        ],
    );
    assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().chat_template(), Some("json"));
    write_dir(dir.path(), &[("chat_template.jinja", "jinja {{ x }}\n")]);
    assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().chat_template(), Some("jinja {{ x }}\n"));
}

#[test]
fn special_token_texts_come_from_tokenizer_config() {
    let json = spm_json(LLAMA2_SPECIALS, Some("<s>"), SpmStyle::Llama2);
    let cfg = r#"{"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>",
                  "pad_token": null, "add_bos_token": true}"#;
    let dir = model_dir(&json, &[("tokenizer_config.json", cfg)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_token(), Some("<s>"));
    assert_eq!(tok.eos_token(), Some("</s>"));
    assert_eq!(tok.unk_token(), Some("<unk>"));
    assert_eq!(tok.pad_token(), None);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), &[2]);
}

// ---------------------------------------------------------------------------------------------
// Streaming

fn assert_stream_matches(tok: &Tokenizer, ids: &[u32], label: &str) {
    for skip in [false, true] {
        let want = tok.decode(ids, skip).unwrap();
        let got = stream_text(tok, ids, skip);
        assert_eq!(got, want, "{label} skip={skip} ids={ids:?}");
    }
}

#[test]
fn streaming_equals_decode_on_the_corpus() {
    for f in fixtures() {
        for &text in CORPUS {
            for add in [false, true] {
                let ids = f.tokenizer.encode(text, add).unwrap();
                assert_stream_matches(&f.tokenizer, &ids, &format!("{} {text:?}", f.name));
            }
        }
        let all = CORPUS.join("<|im_end|>\n<|eot_id|></s><end_of_turn>");
        let ids = f.tokenizer.encode(&all, true).unwrap();
        assert_stream_matches(&f.tokenizer, &ids, f.name);
    }
}

#[test]
fn streaming_equals_decode_on_every_slice() {
    // Slices start and end inside characters: anywhere for byte-level BPE, and on whole
    // characters for byte fallback (see `whole_characters`).
    for f in fixtures() {
        for &text in &["I ❤️ Rust 🦀 and 😀😀", "你好，世界", "family: 👨‍👩‍👧‍👦 e\u{301}", "a  b\n\n c"]
        {
            let ids = f.tokenizer.encode(text, true).unwrap();
            for start in 0..ids.len() {
                for end in start..=ids.len() {
                    let slice = whole_characters(&f.tokenizer, &ids[start..end]);
                    assert_stream_matches(&f.tokenizer, slice, &format!("{} {text:?} {start}..{end}", f.name));
                }
            }
        }
    }
}

#[test]
fn streaming_holds_a_character_until_its_last_byte() {
    let fx = fixtures();
    let bl = &fx[0].tokenizer;
    let ids = bl.encode("🦀!", false).unwrap();
    let mut dec = bl.stream_decoder(false);
    let pieces = stream_pieces(&mut dec, &ids);
    assert!(pieces[0].is_empty(), "{pieces:?}");
    assert!(pieces.iter().any(|p| p.contains('🦀')));
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");

    let spm = &fx.iter().find(|f| f.name == "spm-llama2").unwrap().tokenizer;
    let ids = spm.encode("a€", false).unwrap();
    let mut dec = spm.stream_decoder(true);
    let pieces: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    assert_eq!(pieces, ["a", "", "", "€"]);
    assert!(!dec.has_pending());
    assert_eq!(dec.finish().unwrap(), "");
}

#[test]
fn streaming_keeps_sentencepiece_spaces() {
    for name in ["spm-llama2", "spm-metaspace", "spm-gemma"] {
        let fx = fixtures();
        let tok = &fx.iter().find(|f| f.name == name).unwrap().tokenizer;
        let ids = tok.encode("hello the world", true).unwrap();
        let pieces = stream_pieces(&mut tok.stream_decoder(true), &ids);
        let text = pieces.concat();
        assert_eq!(text, tok.decode(&ids, true).unwrap(), "{name}");
        assert_eq!(text, "hello the world", "{name}");
        // Pieces after the first keep their leading space.
        assert!(pieces.iter().filter(|p| !p.is_empty()).skip(1).any(|p| p.starts_with(' ')), "{name}: {pieces:?}");
    }
}

#[test]
fn streaming_emits_invalid_bytes_as_replacement_characters() {
    let fx = fixtures();
    let bl = &fx[0].tokenizer;
    let byte = |b: u8| bl.token_to_id(&byte_to_char()[usize::from(b)].to_string()).unwrap();
    // A lone 0xFF, an unfinished E2 82 followed by text, and an unfinished sequence at the end.
    for ids in [vec![byte(0xFF)], vec![byte(0xE2), byte(0x82), byte(b'a')], vec![byte(b'a'), byte(0xE2), byte(0x82)]] {
        let want = bl.decode(&ids, false).unwrap();
        assert!(want.contains('\u{FFFD}'));
        assert_eq!(stream_text(bl, &ids, false), want, "{ids:?}");
    }

    let spm = &fx.iter().find(|f| f.name == "spm-llama2").unwrap().tokenizer;
    let b = |s: &str| spm.token_to_id(s).unwrap();
    let ids = [b("a"), b("<0xE2>"), b("<0x82>")];
    assert_eq!(stream_text(spm, &ids, false), spm.decode(&ids, false).unwrap());
    assert_eq!(stream_text(spm, &ids, false), "a��");

    // A byte run that mixes a valid character with invalid bytes: the ByteFallback decoder
    // replaces the whole run, but the stream has already emitted the valid "é".
    let ids = [b("<0xC3>"), b("<0xA9>"), b("<0xE2>"), b("<0x82>"), b("a")];
    assert_eq!(spm.decode(&ids, false).unwrap(), "����a");
    assert_eq!(stream_text(spm, &ids, false), "é��a");
}

#[test]
fn a_cut_byte_fallback_run_keeps_its_valid_characters() {
    // Generation that stops inside a character (a token limit): "❤" then the first byte of U+FE0F.
    let fx = fixtures();
    let spm = &fx.iter().find(|f| f.name == "spm-gemma").unwrap().tokenizer;
    let ids = spm.encode("I ❤\u{fe0f}", false).unwrap();
    let cut = &ids[..ids.len() - 2];
    assert_eq!(byte_value(spm, *cut.last().unwrap()), Some(0xEF));
    // Hugging Face replaces every byte of the run; the stream keeps the "❤" it already emitted
    // (as mlx-lm's streaming detokeniser does) and replaces the one unfinished byte.
    assert_eq!(spm.decode(cut, false).unwrap(), "I ����");
    let pieces = stream_pieces(&mut spm.stream_decoder(false), cut);
    assert_eq!(pieces.concat(), "I ❤�");
    assert_eq!(pieces.last().map(String::as_str), Some("�"));
    assert_eq!(whole_characters(spm, cut), &cut[..cut.len() - 1]);
}

#[test]
fn a_long_run_of_invalid_bytes_is_emitted_without_waiting_for_the_end() {
    let fx = fixtures();
    let bl = &fx[0].tokenizer;
    let ff = bl.token_to_id(&byte_to_char()[0xFF].to_string()).unwrap();
    let mut dec = bl.stream_decoder(false);
    let mut out = String::new();
    for _ in 0..200 {
        out.push_str(&dec.push(ff).unwrap());
    }
    assert!(!out.is_empty(), "the window must not grow without bound");
    out.push_str(&dec.finish().unwrap());
    assert_eq!(out, "\u{FFFD}".repeat(200));
}

#[test]
fn a_stream_decoder_can_be_reset_and_reused() {
    let fx = fixtures();
    let tok = &fx.iter().find(|f| f.name == "spm-metaspace").unwrap().tokenizer;
    let ids = tok.encode("hello world", false).unwrap();
    let mut dec = tok.stream_decoder(false);
    assert_eq!(stream_pieces(&mut dec, &ids).concat(), "hello world");
    // finish() started afresh: the leading space is stripped again.
    assert_eq!(stream_pieces(&mut dec, &ids).concat(), "hello world");
    dec.push(ids[0]).unwrap();
    dec.reset();
    assert!(!dec.has_pending());
    assert_eq!(stream_pieces(&mut dec, &ids).concat(), "hello world");
}

fn text_strategy() -> impl Strategy<Value = String> {
    let pool: Vec<&str> = vec![
        "a",
        "b",
        "the",
        " ",
        "  ",
        "\n",
        "\t",
        "hello",
        "world",
        "é",
        "e\u{301}",
        "ñ",
        "你",
        "好",
        "世",
        "界",
        "🦀",
        "😀",
        "❤️",
        "👨‍👩‍👧",
        "🇬🇧",
        "\u{200D}",
        "€",
        "∑",
        "ß",
        "Ω",
        "\u{FFFD}",
        "!",
        "'s",
        "123",
        "<|eot_id|>",
        "<s>",
        "<end_of_turn>",
        "▁",
        "Ġ",
    ];
    proptest::collection::vec(proptest::sample::select(pool), 0..24).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_stream_equals_decode(text in text_strategy(), cut in 0usize..64, len in 0usize..64) {
        for f in fixtures() {
            let ids = f.tokenizer.encode(&text, true).unwrap();
            for skip in [false, true] {
                prop_assert_eq!(stream_text(&f.tokenizer, &ids, skip), f.tokenizer.decode(&ids, skip).unwrap());
                let start = cut.min(ids.len());
                let end = (start + len).min(ids.len());
                let slice = whole_characters(&f.tokenizer, &ids[start..end]);
                prop_assert_eq!(stream_text(&f.tokenizer, slice, skip), f.tokenizer.decode(slice, skip).unwrap());
            }
        }
    }

    #[test]
    fn prop_byte_level_round_trips(text in text_strategy()) {
        let fx = fixtures();
        let tok = &fx[0].tokenizer;
        let ids = tok.encode(&text, false).unwrap();
        prop_assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

// ---------------------------------------------------------------------------------------------
// Stop strings

fn run_stop(stops: &[&str], chunks: &[&str]) -> (String, bool) {
    let mut m = StopMatcher::new(stops.iter().copied());
    let mut out = String::new();
    for chunk in chunks {
        let StopChunk { text, stopped } = m.push(chunk);
        out.push_str(&text);
        if stopped {
            return (out, true);
        }
    }
    out.push_str(&m.finish());
    (out, false)
}

#[test]
fn stop_strings_are_found_across_chunks() {
    assert_eq!(run_stop(&["</s>"], &["Hello <", "/", "s> more"]), ("Hello ".into(), true));
    assert_eq!(run_stop(&["STOP"], &["xST", "OPy"]), ("x".into(), true));
    assert_eq!(run_stop(&["STOP"], &["STOP"]), (String::new(), true));
    assert_eq!(run_stop(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
}

#[test]
fn a_false_start_is_released() {
    assert_eq!(run_stop(&["</s>"], &["a <", "b"]), ("a <b".into(), false));
    assert_eq!(run_stop(&["</s>"], &["a </"]), ("a </".into(), false), "finish releases held text");
    let mut m = StopMatcher::new(["abc"]);
    assert_eq!(m.push("xab").text, "x");
    assert!(m.has_pending());
    assert_eq!(m.push("ab").text, "ab", "the first 'ab' cannot start 'abc' any more");
    assert_eq!(m.push("c"), StopChunk { text: String::new(), stopped: true });
    assert_eq!(m.matched(), Some("abc"));
}

#[test]
fn after_a_stop_nothing_more_is_emitted() {
    let mut m = StopMatcher::new(["x", "", "x"]);
    assert_eq!(m.stops(), ["x"]);
    assert!(m.push("axb").stopped);
    assert!(m.is_stopped());
    assert_eq!(m.push("more"), StopChunk { text: String::new(), stopped: true });
    assert_eq!(m.finish(), "");
    assert!(!m.is_stopped(), "finish starts afresh");
    assert_eq!(m.push("ab").text, "ab");
}

#[test]
fn the_earliest_stop_wins() {
    assert_eq!(run_stop(&["world", "lo w"], &["hello world"]), ("hel".into(), true));
    let mut m = StopMatcher::new(["ab", "abc"]);
    let c = m.push("zabc");
    assert_eq!(c.text, "z");
    assert_eq!(m.matched(), Some("abc"), "at one position the longest wins");
}

#[test]
fn stop_strings_work_on_streamed_tokens() {
    let fx = fixtures();
    let tok = &fx[0].tokenizer;
    let ids = tok.encode("hello world 🦀<|eot_id|> after", false).unwrap();
    let mut dec = tok.stream_decoder(false);
    let mut stop = StopMatcher::new(["🦀<|eot"]);
    let mut out = String::new();
    for &id in &ids {
        let chunk = stop.push(&dec.push(id).unwrap());
        out.push_str(&chunk.text);
        if chunk.stopped {
            break;
        }
    }
    assert_eq!(out, "hello world ");
    assert!(stop.is_stopped());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_stop_matcher_emits_exactly_the_text_before_the_first_stop(
        text in "[ab€ ]{0,24}",
        stop in "[ab€]{1,3}",
        cuts in proptest::collection::vec(0usize..32, 0..8),
    ) {
        let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).filter(|&c| text.is_char_boundary(c)).collect();
        bounds.push(0);
        bounds.push(text.len());
        bounds.sort_unstable();
        let chunks: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
        let (out, stopped) = run_stop(&[stop.as_str()], &chunks);
        match text.find(&stop) {
            Some(pos) => {
                prop_assert!(stopped);
                prop_assert_eq!(out, &text[..pos]);
            }
            None => {
                prop_assert!(!stopped);
                prop_assert_eq!(out, text);
            }
        }
    }
}
