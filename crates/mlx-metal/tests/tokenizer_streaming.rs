// SPDX-License-Identifier: EUPL-1.2
//! Streaming detokenisation: token by token equals decoding the whole, a character is held until
//! its last byte, invalid bytes become replacement characters, and the decoder can be reset.

mod text_common;

use mlx_metal::tokenizer::Tokenizer;
use proptest::prelude::*;
use text_common::*;

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
