// SPDX-License-Identifier: EUPL-1.2
//! The KV caches against mlx-lm's `KVCache` and `RotatingKVCache`.
//!
//! Every expected value here (buffer sizes, returned, stored and ordered
//! positions, masks) was printed once by mlx-lm 0.32.2 itself, running the
//! same sequence of updates on its caches (`mlx_lm.models.cache`) in the
//! project's virtualenv, and hard-coded. Keys and values are `[1, 1, n, 2]`:
//! position `p` (1-based, counting every token ever written) has keys
//! `(p, -p)` and values `(10p, -10p)`, so reading a cache back says which
//! positions it holds and in what order.
//!
//! The last test runs gemma3-tiny (sliding window 8) with the prompt prefilled
//! in chunks of 1, 3, 5, 8 and 2048 tokens: chunked prefill through the
//! rotating caches must give what one-shot prefill gives (in mlx-lm the
//! log-probabilities are bit for bit the same), and one-shot must give the
//! golden logits and greedy tokens.

use std::ops::ControlFlow;

use mlx::Array;
use mlx_metal::Error;
use mlx_metal::cache::{BatchKvCache, KvCache, LayerCache, Mask, RotatingKvCache, causal_mask};
use mlx_metal::generate::{LoopOptions, generate};
use mlx_metal::model::{self, LanguageModel};
use mlx_metal::sample::{Sampler, SamplerConfig};
use mlx_metal::tokenizer::Tokenizer;
use parity::{Fixture, Tolerances};

/// Keys and values for positions `start .. start + n` (1-based).
fn kv(start: i32, n: i32) -> (Array, Array) {
    let k: Vec<f32> = (start..start + n).flat_map(|p| [p as f32, -(p as f32)]).collect();
    let v: Vec<f32> = k.iter().map(|x| x * 10.0).collect();
    (Array::from_slice(&k, &[1, 1, n, 2]).unwrap(), Array::from_slice(&v, &[1, 1, n, 2]).unwrap())
}

/// The positions a keys array holds, in its order (checking the values match).
fn positions(keys: &Array, values: &Array) -> Vec<i32> {
    assert_eq!(keys.ndim(), 4);
    assert_eq!(keys.shape(), values.shape());
    let (k, v) = (keys.to_vec_f32().unwrap(), values.to_vec_f32().unwrap());
    k.chunks(2)
        .zip(v.chunks(2))
        .map(|(k, v)| {
            assert_eq!(k[1], -k[0], "keys of one position");
            assert_eq!(v, [k[0] * 10.0, k[1] * 10.0], "values of position {}", k[0]);
            k[0] as i32
        })
        .collect()
}

/// Which positions a pair of arrays holds.
fn pos(pair: (Array, Array)) -> Vec<i32> {
    positions(&pair.0, &pair.1)
}

/// The length of the buffer behind a cache.
fn buffer_len(state: &[&Array]) -> i32 {
    assert_eq!(state.len(), 2, "keys and values");
    state[0].dim(2).unwrap()
}

/// A mask as text: `none`, `causal`, or its shape and rows of 0/1.
fn pattern(m: &Mask) -> String {
    match m {
        Mask::None => "none".into(),
        Mask::Causal => "causal".into(),
        Mask::Array(a) => {
            let shape = a.shape();
            let bits: String = a.to_vec::<bool>().unwrap().iter().map(|&b| if b { '1' } else { '0' }).collect();
            let width = *shape.last().unwrap() as usize;
            let rows: Vec<&str> = (0..bits.len() / width).map(|r| &bits[r * width..(r + 1) * width]).collect();
            format!("{shape:?} {}", rows.join(" "))
        }
    }
}

// --- KvCache ----------------------------------------------------------------------------------

#[test]
fn kv_cache_grows_in_steps_of_256_and_returns_exactly_what_was_written() {
    let mut c = KvCache::new();
    assert!(c.keys_and_values().is_err(), "an empty cache has nothing to fetch");
    assert!(c.state().is_empty());
    // (tokens in the update, offset after, buffer length after), from mlx-lm: a full buffer
    // grows by whole steps of 256; a partly used one is cut to the offset first (255 + 256).
    let plan = [(1, 1, 256), (254, 255, 256), (3, 258, 511), (300, 558, 770), (1, 559, 770)];
    let mut next = 1;
    for (n, offset, buffer) in plan {
        let (k, v) = kv(next, n);
        next += n;
        let got = pos(c.update_and_fetch(&k, &v).unwrap());
        assert_eq!(got, (1..next).collect::<Vec<_>>(), "after an update of {n}");
        assert_eq!(c.offset(), offset);
        assert_eq!(buffer_len(&c.state()), buffer, "buffer after an update of {n}");
        assert_eq!(pos(c.keys_and_values().unwrap()), got);
    }
}

#[test]
fn kv_cache_trim_forgets_the_last_positions_and_overwrites_them() {
    let mut c = KvCache::new();
    let (k, v) = kv(1, 10);
    c.update_and_fetch(&k, &v).unwrap();
    assert_eq!(c.trim(3), 3);
    assert_eq!(c.offset(), 7);
    assert_eq!(c.trim(-2), 0, "a negative trim does nothing");
    let (k, v) = kv(100, 2);
    assert_eq!(pos(c.update_and_fetch(&k, &v).unwrap()), [1, 2, 3, 4, 5, 6, 7, 100, 101]);
    assert_eq!(buffer_len(&c.state()), 256);
    assert_eq!(c.trim(100), 9, "at most everything");
    assert_eq!(c.offset(), 0);

    // Trimmed back to 250 of a full 256, then 10 more: the buffer is cut to 250 and grows.
    let mut c = KvCache::new();
    let (k, v) = kv(1, 256);
    c.update_and_fetch(&k, &v).unwrap();
    assert_eq!(c.trim(6), 6);
    let (k, v) = kv(1000, 10);
    let got = pos(c.update_and_fetch(&k, &v).unwrap());
    assert_eq!(c.offset(), 260);
    assert_eq!(buffer_len(&c.state()), 506);
    let want: Vec<i32> = (1..=250).chain(1000..1010).collect();
    assert_eq!(got, want);
}

#[test]
fn kv_cache_rejects_keys_that_are_not_four_dimensional() {
    let mut c = KvCache::new();
    let k = Array::from_slice(&[1.0f32, 2.0], &[1, 2]).unwrap();
    let e = c.update_and_fetch(&k, &k).unwrap_err();
    assert!(e.to_string().contains("[B, H, L, D]"), "{e}");
}

#[test]
fn kv_cache_masks_match_mlx_lm() {
    // (queries, offset, window, mask), from mlx-lm's KVCache.make_mask.
    let cases: [(i32, i32, Option<i32>, &str); 6] = [
        (1, 0, None, "none"),
        (3, 0, None, "causal"),
        (1, 5, Some(3), "[1, 6] 000111"),
        (3, 2, None, "causal"),
        (3, 2, Some(2), "[3, 5] 01100 00110 00011"),
        (4, 0, Some(2), "[4, 4] 1000 1100 0110 0011"),
    ];
    for (n, offset, window, want) in cases {
        let mut c = KvCache::new();
        if offset > 0 {
            let (k, v) = kv(1, offset);
            c.update_and_fetch(&k, &v).unwrap();
        }
        assert_eq!(pattern(&c.make_mask(n, window).unwrap()), want, "n {n}, offset {offset}, window {window:?}");
    }
    // The free function is mlx-lm's create_causal_mask.
    let m = causal_mask(2, 3, None).unwrap();
    assert_eq!(pattern(&Mask::Array(m)), "[2, 5] 11110 11111");
}

// --- RotatingKvCache --------------------------------------------------------------------------

/// One step of a plan: tokens in the update, then what mlx-lm had after it: offset, returned
/// positions (what attention sees), stored positions (`keys_and_values`), chronological order.
type Expect = (i32, i32, &'static [i32], &'static [i32], &'static [i32]);

fn run_plan(c: &mut RotatingKvCache, plan: &[Expect]) {
    let mut next = 1;
    for (step, &(n, offset, returned, stored, ordered)) in plan.iter().enumerate() {
        let (k, v) = kv(next, n);
        next += n;
        let got = pos(c.update_and_fetch(&k, &v).unwrap());
        assert_eq!(got, returned, "step {step} (update of {n}): returned");
        assert_eq!(c.offset(), offset, "step {step}: offset");
        assert_eq!(pos(c.keys_and_values().unwrap()), stored, "step {step}: stored");
        assert_eq!(pos(c.ordered().unwrap()), ordered, "step {step}: chronological");
    }
}

#[test]
fn rotating_cache_keeps_the_last_max_size_single_tokens() {
    let mut c = RotatingKvCache::new(4).unwrap();
    assert!(c.is_empty());
    assert_eq!(c.len(), 0);
    run_plan(
        &mut c,
        &[
            (1, 1, &[1], &[1], &[1]),
            (1, 2, &[1, 2], &[1, 2], &[1, 2]),
            (1, 3, &[1, 2, 3], &[1, 2, 3], &[1, 2, 3]),
            (1, 4, &[1, 2, 3, 4], &[1, 2, 3, 4], &[1, 2, 3, 4]),
            (1, 5, &[5, 2, 3, 4], &[5, 2, 3, 4], &[2, 3, 4, 5]),
            (1, 6, &[5, 6, 3, 4], &[5, 6, 3, 4], &[3, 4, 5, 6]),
        ],
    );
    assert_eq!(c.len(), 4);
    assert_eq!(c.max_size(), 4);
    assert_eq!(buffer_len(&c.state()), 4);
    assert!(!c.is_trimmable(), "positions have been rotated out");
}

#[test]
fn rotating_cache_multi_token_updates_return_the_whole_pass_then_trim() {
    // An update of several tokens returns every kept position plus all the new ones, so each new
    // query sees a full window; the next update first cuts the cache to max_size - 1 old ones.
    let mut c = RotatingKvCache::new(4).unwrap();
    run_plan(
        &mut c,
        &[
            (3, 3, &[1, 2, 3], &[1, 2, 3], &[1, 2, 3]),
            (6, 9, &[1, 2, 3, 4, 5, 6, 7, 8, 9], &[1, 2, 3, 4, 5, 6, 7, 8, 9], &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
            (2, 11, &[7, 8, 9, 10, 11], &[7, 8, 9, 10, 11], &[7, 8, 9, 10, 11]),
            (1, 12, &[12, 9, 10, 11], &[12, 9, 10, 11], &[9, 10, 11, 12]),
            (1, 13, &[12, 13, 10, 11], &[12, 13, 10, 11], &[10, 11, 12, 13]),
        ],
    );
    assert_eq!(buffer_len(&c.state()), 4);
}

#[test]
fn rotating_cache_with_keep_never_rotates_out_the_first_tokens() {
    let mut c = RotatingKvCache::with_keep(6, 2).unwrap();
    run_plan(
        &mut c,
        &[
            (1, 1, &[1], &[1], &[1]),
            (1, 2, &[1, 2], &[1, 2], &[1, 2]),
            (1, 3, &[1, 2, 3], &[1, 2, 3], &[1, 2, 3]),
            (1, 4, &[1, 2, 3, 4], &[1, 2, 3, 4], &[1, 2, 3, 4]),
            (1, 5, &[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]),
            (1, 6, &[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4, 5, 6]),
            (1, 7, &[1, 2, 7, 4, 5, 6], &[1, 2, 7, 4, 5, 6], &[1, 2, 4, 5, 6, 7]),
            (1, 8, &[1, 2, 7, 8, 5, 6], &[1, 2, 7, 8, 5, 6], &[1, 2, 5, 6, 7, 8]),
            (1, 9, &[1, 2, 7, 8, 9, 6], &[1, 2, 7, 8, 9, 6], &[1, 2, 6, 7, 8, 9]),
            (1, 10, &[1, 2, 7, 8, 9, 10], &[1, 2, 7, 8, 9, 10], &[1, 2, 7, 8, 9, 10]),
            (3, 13, &[1, 2, 8, 9, 10, 11, 12, 13], &[1, 2, 8, 9, 10, 11, 12, 13], &[1, 2, 8, 9, 10, 11, 12, 13]),
            (1, 14, &[1, 2, 14, 11, 12, 13], &[1, 2, 14, 11, 12, 13], &[1, 2, 11, 12, 13, 14]),
        ],
    );

    let mut c = RotatingKvCache::with_keep(6, 2).unwrap();
    run_plan(
        &mut c,
        &[
            (4, 4, &[1, 2, 3, 4], &[1, 2, 3, 4], &[1, 2, 3, 4]),
            (5, 9, &[1, 2, 3, 4, 5, 6, 7, 8, 9], &[1, 2, 3, 4, 5, 6, 7, 8, 9], &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
            (1, 10, &[1, 2, 10, 7, 8, 9], &[1, 2, 10, 7, 8, 9], &[1, 2, 7, 8, 9, 10]),
            (1, 11, &[1, 2, 10, 11, 8, 9], &[1, 2, 10, 11, 8, 9], &[1, 2, 8, 9, 10, 11]),
        ],
    );
}

#[test]
fn rotating_cache_trim_before_it_wraps() {
    let mut c = RotatingKvCache::new(4).unwrap();
    for p in 1..=2 {
        let (k, v) = kv(p, 1);
        c.update_and_fetch(&k, &v).unwrap();
    }
    assert!(c.is_trimmable());
    assert_eq!(c.trim(1), 1);
    assert_eq!(c.offset(), 1);
    let (k, v) = kv(10, 1);
    assert_eq!(pos(c.update_and_fetch(&k, &v).unwrap()), [1, 10]);
    assert_eq!(pos(c.ordered().unwrap()), [1, 10]);
    assert_eq!(c.offset(), 2);
}

#[test]
fn rotating_cache_rejects_bad_sizes() {
    for (max, keep) in [(0, 0), (-1, 0), (4, 4), (4, 5), (4, -1)] {
        let e = RotatingKvCache::with_keep(max, keep).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { op: "rotating_kv_cache", .. }), "{e}");
        assert!(e.to_string().contains("max size"), "{e}");
    }
    assert!(RotatingKvCache::new(4).unwrap().ordered().is_err(), "an empty cache has nothing to fetch");
}

/// From `cache` as given, for each of `wants` in turn: checks what `masks` makes of the cache
/// against it, then writes the next single token (positions 1, 2, …).
fn masks_token_by_token<G: PartialEq<W> + std::fmt::Debug, W: std::fmt::Debug>(
    mut cache: RotatingKvCache,
    wants: impl IntoIterator<Item = W>,
    masks: impl Fn(&RotatingKvCache) -> G,
) {
    for (p, want) in (1..).zip(wants) {
        assert_eq!(masks(&cache), want, "with {} cached", cache.offset());
        let (k, v) = kv(p, 1);
        cache.update_and_fetch(&k, &v).unwrap();
    }
}

#[test]
fn rotating_cache_masks_match_mlx_lm() {
    // max 4: before each of seven single-token updates, the masks for 1, 2, 3 and 5 queries with
    // the default window (max_size) and for 1 and 2 queries with window 3; from mlx-lm's
    // RotatingKVCache.make_mask.
    let plan: [[&str; 6]; 7] = [
        ["none", "causal", "causal", "[5, 5] 10000 11000 11100 11110 01111", "none", "causal"],
        ["none", "causal", "causal", "[5, 6] 110000 111000 111100 011110 001111", "none", "causal"],
        [
            "none",
            "causal",
            "[3, 5] 11100 11110 01111",
            "[5, 7] 1110000 1111000 0111100 0011110 0001111",
            "none",
            "[2, 4] 1110 0111",
        ],
        [
            "none",
            "[2, 5] 11110 01111",
            "[3, 6] 111100 011110 001111",
            "[5, 8] 11110000 01111000 00111100 00011110 00001111",
            "[4] 0111",
            "[2, 5] 01110 00111",
        ],
        [
            "none",
            "[2, 5] 11110 01111",
            "[3, 6] 111100 011110 001111",
            "[5, 8] 11110000 01111000 00111100 00011110 00001111",
            "[4] 1011",
            "[2, 5] 01110 00111",
        ],
        [
            "none",
            "[2, 5] 11110 01111",
            "[3, 6] 111100 011110 001111",
            "[5, 8] 11110000 01111000 00111100 00011110 00001111",
            "[4] 1101",
            "[2, 5] 01110 00111",
        ],
        [
            "none",
            "[2, 5] 11110 01111",
            "[3, 6] 111100 011110 001111",
            "[5, 8] 11110000 01111000 00111100 00011110 00001111",
            "[4] 1110",
            "[2, 5] 01110 00111",
        ],
    ];
    masks_token_by_token(RotatingKvCache::new(4).unwrap(), plan, |c| {
        [
            c.make_mask(1, None),
            c.make_mask(2, None),
            c.make_mask(3, None),
            c.make_mask(5, None),
            c.make_mask(1, Some(3)),
            c.make_mask(2, Some(3)),
        ]
        .map(|m| pattern(&m.unwrap()))
    });

    // max 8, window 4: one query at a time, the mask in storage order, rolled as the cache wraps.
    let want = [
        "none",
        "none",
        "none",
        "none",
        "[5] 01111",
        "[6] 001111",
        "[7] 0001111",
        "[8] 00001111",
        "[8] 10000111",
        "[8] 11000011",
        "[8] 11100001",
        "[8] 11110000",
    ];
    masks_token_by_token(RotatingKvCache::new(8).unwrap(), want, |c| pattern(&c.make_mask(1, Some(4)).unwrap()));
}

#[test]
fn layer_cache_dispatches_to_its_cache() {
    let mut layers = [LayerCache::Standard(KvCache::new()), LayerCache::Rotating(RotatingKvCache::new(4).unwrap())];
    for p in 1..=6 {
        let (k, v) = kv(p, 1);
        for l in &mut layers {
            l.update_and_fetch(&k, &v).unwrap();
        }
    }
    let [standard, rotating] = &mut layers;
    assert_eq!((standard.offset(), rotating.offset()), (6, 6));
    assert!(standard.is_trimmable() && !rotating.is_trimmable());
    assert_eq!(pattern(&standard.make_mask(2, None).unwrap()), "causal");
    assert_eq!(pattern(&rotating.make_mask(2, None).unwrap()), "[2, 5] 11110 01111");
    assert_eq!(buffer_len(&standard.state()), 256);
    assert_eq!(buffer_len(&rotating.state()), 4);
    assert_eq!(standard.trim(2), 2);
    assert_eq!(standard.offset(), 4);
}

/// A batch's sliding-window layers: without padding, no mask for a decode step (and the plain
/// causal one for several queries) until the window hides a key, as a sequence's own rotating
/// cache decides; then the window's mask. With padding, always a mask (it hides the padding).
#[test]
fn a_batch_masks_a_window_only_once_it_hides_a_key() {
    let (mut plain, mut padded) = (BatchKvCache::new(vec![0]).unwrap(), BatchKvCache::new(vec![1]).unwrap());
    let mut seen = Vec::new();
    for p in 1..=5 {
        let (k, v) = kv(p, 1);
        plain.update_and_fetch(&k, &v).unwrap();
        padded.update_and_fetch(&k, &v).unwrap();
        seen.push(pattern(&plain.make_mask(1, Some(4)).unwrap()));
        seen.push(pattern(&plain.make_mask(2, Some(4)).unwrap()));
        assert!(matches!(padded.make_mask(1, Some(4)).unwrap(), Mask::Array(_)), "padding is always masked");
    }
    let want = [
        "none",
        "causal",
        "none",
        "causal",
        "none",
        "[1, 1, 2, 5] 11110 01111",
        "[1, 1, 1, 5] 01111",
        "[1, 1, 2, 6] 011110 001111",
        "[1, 1, 1, 6] 001111",
        "[1, 1, 2, 7] 0011110 0001111",
    ];
    assert_eq!(seen, want);
}

// --- chunked prefill through a sliding window -------------------------------------------------

const PARAGRAPH: &str = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a \
                         single step, and the first step of this one is a test.";

struct Run {
    tokens: Vec<u32>,
    logprobs: Vec<Vec<f32>>,
}

fn greedy(model: &dyn LanguageModel, prompt: &[u32], prefill_step: usize, n: usize) -> Run {
    let mut caches = model.make_cache().unwrap();
    let sampler = Sampler::new(SamplerConfig::default()).unwrap();
    let opts = LoopOptions { max_tokens: n, prefill_step };
    let mut run = Run { tokens: Vec::new(), logprobs: Vec::new() };
    generate(model, &mut caches, prompt, &sampler, &opts, &|| false, |step| {
        run.tokens.push(step.id);
        run.logprobs.push(step.logprobs.to_vec_f32()?);
        Ok(ControlFlow::Continue(()))
    })
    .unwrap();
    run
}

#[test]
fn chunked_prefill_through_the_sliding_window_equals_one_shot() {
    let fixture = Fixture::load("gemma3-tiny").unwrap_or_else(|e| panic!("{e}"));
    let loaded = model::load(&fixture.model_dir).unwrap();
    let m = loaded.model.as_ref();
    let layers = m.make_cache().unwrap();
    assert!(layers.iter().any(|l| matches!(l, LayerCache::Rotating(c) if c.max_size() == 8)), "a window of 8");
    let tol = Tolerances::for_golden(&fixture.golden);

    let tokenizer = Tokenizer::from_dir(&fixture.model_dir).unwrap();
    let paragraph = tokenizer.encode_prompt(PARAGRAPH).unwrap();
    assert!(paragraph.len() > 60, "{} tokens", paragraph.len());
    let pangram = fixture.golden.greedy.iter().find(|g| g.name == "pangram").expect("a pangram greedy run");
    for (name, prompt) in [("pangram", &pangram.prompt), ("paragraph", &paragraph)] {
        let one_shot = greedy(m, prompt, 2048, 32);
        for step in [1, 3, 5, 8] {
            let chunked = greedy(m, prompt, step, 32);
            assert_eq!(chunked.tokens, one_shot.tokens, "{name}: prefill in chunks of {step}");
            for (i, (a, b)) in chunked.logprobs.iter().zip(&one_shot.logprobs).enumerate() {
                let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                // mlx-lm's are bit for bit the same; allow the parity tolerance all the same.
                assert!(
                    a.iter().zip(b).all(|(x, y)| tol.logprobs.accepts(f64::from(*y), f64::from(*x))),
                    "{name}: chunks of {step}, step {i}: log-probabilities differ by up to {worst}"
                );
            }
        }
    }

    // One-shot prefill is mlx-lm's: the pangram's golden greedy run and last logits row.
    let one_shot = greedy(m, &pangram.prompt, 3, 32);
    assert_eq!(one_shot.tokens, pangram.tokens);
    let seq = fixture.golden.sequences.iter().find(|s| s.tokens == pangram.prompt).expect("the pangram sequence");
    let last = seq.logits.as_ref().unwrap().last().unwrap();
    let lse = {
        let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        f64::from(max) + last.iter().map(|&x| (f64::from(x) - f64::from(max)).exp()).sum::<f64>().ln()
    };
    let first = &one_shot.logprobs[0];
    for (id, (&logit, &lp)) in last.iter().zip(first).enumerate() {
        let want = f64::from(logit) - lse;
        assert!(tol.logprobs.accepts(want, f64::from(lp)), "id {id}: log-probability {lp}, mlx-lm's {want}");
    }
}
