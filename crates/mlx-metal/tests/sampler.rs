// SPDX-License-Identifier: EUPL-1.2
//! The sampler's settings and filters: bad settings are refused with an error
//! that names the setting, and the filters (`apply_top_k`, `apply_top_p`,
//! `apply_min_p`, mlx-lm's `sample_utils` functions) keep exactly the tokens
//! worked out by hand below, setting the rest to -inf.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use mlx::{Array, Dtype, ops};
use mlx_metal::Error;
use mlx_metal::sample::{KeySequence, Sampler, SamplerConfig, apply_min_p, apply_top_k, apply_top_p};

/// Two rows of probabilities, in different orders (no ties, no sums on a threshold).
const PROBS: [[f32; 5]; 2] = [[0.1, 0.4, 0.2, 0.25, 0.05], [0.25, 0.05, 0.4, 0.1, 0.2]];

/// `log(PROBS)`, `[2, 5]`.
fn logprobs() -> Array {
    let lp: Vec<f32> = PROBS.iter().flatten().map(|p| p.ln()).collect();
    Array::from_slice(&lp, &[2, 5]).unwrap()
}

/// Which entries of each row survived (finite and unchanged), as 0/1 strings.
fn kept(input: &Array, output: &Array) -> [String; 2] {
    assert_eq!(output.shape(), input.shape());
    assert_eq!(output.dtype(), input.dtype());
    let (i, o) = (input.to_vec_f32().unwrap(), output.to_vec_f32().unwrap());
    let row = |r: usize| {
        (0..5)
            .map(|c| {
                let (a, b) = (i[r * 5 + c], o[r * 5 + c]);
                if b == f32::NEG_INFINITY {
                    '0'
                } else {
                    assert_eq!(a, b, "row {r} column {c}: a kept value must not change");
                    '1'
                }
            })
            .collect::<String>()
    };
    [row(0), row(1)]
}

/// What keeping the `n` most likely tokens (1 to 5) of each row of [`PROBS`] leaves, as [`kept`]
/// writes it.
fn most_likely(n: usize) -> [&'static str; 2] {
    [["01000", "00100"], ["01010", "10100"], ["01110", "10101"], ["11110", "10111"], ["11111", "11111"]][n - 1]
}

/// Applies `filter` to [`logprobs`] with each `(setting, n)` in turn and checks that it kept
/// exactly the `n` most likely tokens of each row.
#[track_caller]
fn check_filter<P: Copy + std::fmt::Debug>(filter: impl Fn(&Array, P) -> mlx::Result<Array>, cases: &[(P, usize)]) {
    let lp = logprobs();
    for &(setting, n) in cases {
        assert_eq!(kept(&lp, &filter(&lp, setting).unwrap()), most_likely(n), "setting {setting:?}");
    }
}

// --- settings ---------------------------------------------------------------------------------

#[track_caller]
fn refused(cfg: SamplerConfig, setting: &str) {
    let e = Sampler::new(cfg.clone()).expect_err(&format!("{cfg:?} should be refused"));
    assert!(matches!(e, Error::InvalidArgument { op: "sampler", .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(setting), "the error for {cfg:?} should name {setting}: {text}");
}

#[test]
fn bad_settings_are_refused_naming_the_setting() {
    let d = SamplerConfig::default;
    refused(SamplerConfig { temperature: -0.5, ..d() }, "temperature");
    refused(SamplerConfig { temperature: f32::NAN, ..d() }, "temperature");
    refused(SamplerConfig { temperature: f32::INFINITY, ..d() }, "temperature");
    refused(SamplerConfig { min_p: 1.5, ..d() }, "min_p");
    refused(SamplerConfig { min_p: -0.1, ..d() }, "min_p");
    refused(SamplerConfig { min_p: f32::NAN, ..d() }, "min_p");
    refused(SamplerConfig { top_p: 1.01, ..d() }, "top_p");
    refused(SamplerConfig { top_p: -0.2, ..d() }, "top_p");
    refused(SamplerConfig { top_p: f32::NAN, ..d() }, "top_p");
    refused(SamplerConfig { min_tokens_to_keep: 0, ..d() }, "min_tokens_to_keep");
    refused(SamplerConfig { repetition_penalty: -1.0, ..d() }, "repetition_penalty");
    refused(SamplerConfig { repetition_penalty: f32::NAN, ..d() }, "repetition_penalty");
    refused(SamplerConfig { repetition_penalty: f32::INFINITY, ..d() }, "repetition_penalty");
    refused(SamplerConfig { repetition_context_size: 0, ..d() }, "repetition_context_size");
}

#[test]
fn the_edges_of_the_ranges_are_accepted() {
    let d = SamplerConfig::default;
    for cfg in [
        d(),
        SamplerConfig { temperature: 0.0, ..d() },
        SamplerConfig { temperature: 5.0, ..d() },
        SamplerConfig { top_p: 0.0, min_p: 0.0, ..d() },
        SamplerConfig { top_p: 1.0, min_p: 1.0, ..d() },
        SamplerConfig { top_k: 100_000, min_tokens_to_keep: 3, ..d() },
        SamplerConfig { repetition_penalty: 0.0, repetition_context_size: 1, ..d() },
    ] {
        let s = Sampler::new(cfg.clone()).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        assert_eq!(s.config(), &cfg);
    }
    // A penalty of 0 or 1 is off (mlx-lm adds no processor for 0; 1 changes nothing).
    assert!(!Sampler::new(SamplerConfig { repetition_penalty: 0.0, ..d() }).unwrap().needs_history());
    assert!(!Sampler::new(d()).unwrap().needs_history());
    assert!(Sampler::new(SamplerConfig { repetition_penalty: 1.1, ..d() }).unwrap().needs_history());
}

// --- filters ----------------------------------------------------------------------------------

#[test]
fn top_k_keeps_the_k_most_likely() {
    check_filter(
        apply_top_k,
        &[
            (1, 1),
            (2, 2),
            (4, 4),
            // 0 and k >= vocabulary keep everything (mlx-lm refuses them; the distribution is the same).
            (0, 5),
            (5, 5),
            (6, 5),
            (usize::MAX, 5),
        ],
    );
}

#[test]
fn top_p_keeps_the_smallest_set_that_reaches_p() {
    // Row 0 sorted: 0.4, 0.25, 0.2, 0.1, 0.05; cumulative 0.4, 0.65, 0.85, 0.95, 1.
    check_filter(apply_top_p, &[(0.3, 1), (0.6, 2), (0.7, 3), (0.9, 4), (0.99, 5)]);
}

#[test]
fn top_p_works_on_bfloat16_and_unnormalised_rows() {
    // The mass is taken relative to the row's total, so scaled logits give the same set.
    let lp = logprobs();
    let shifted = ops::add(&lp, &Array::scalar(3.0f32)).unwrap();
    assert_eq!(kept(&shifted, &apply_top_p(&shifted, 0.6).unwrap()), most_likely(2));
    let bf = ops::astype(&lp, Dtype::Bfloat16).unwrap();
    assert_eq!(kept(&bf, &apply_top_p(&bf, 0.7).unwrap()), most_likely(3));
}

#[test]
fn min_p_drops_tokens_below_min_p_times_the_best() {
    // Row 0: the best is 0.4. Each setting is (min_p, min_tokens_to_keep).
    check_filter(
        |lp, (min_p, keep)| apply_min_p(lp, min_p, keep),
        &[
            // Threshold 0.22: 0.4 and 0.25 stay.
            ((0.55, 1), 2),
            // Threshold 0.12: 0.4, 0.25 and 0.2 stay.
            ((0.3, 1), 3),
            // Threshold 0.36: only the best, unless min_tokens_to_keep says otherwise.
            ((0.9, 1), 1),
            ((0.9, 3), 3),
            ((1.0, 1), 1),
            // 0 keeps everything.
            ((0.0, 1), 5),
        ],
    );
}

#[test]
fn the_repetition_penalty_scales_recent_logits_by_sign() {
    let s = Sampler::new(SamplerConfig { repetition_penalty: 2.0, ..SamplerConfig::default() }).unwrap();
    let logits = Array::from_slice(&[2.0f32, -1.0, 0.5, 3.0], &[1, 4]).unwrap();
    let recent = Array::from_slice(&[0i32, 1, 1], &[3]).unwrap();
    // Positive logits are divided by the penalty, negative ones multiplied; a repeat counts once.
    assert_eq!(s.process(&logits, &recent).unwrap().to_vec_f32().unwrap(), [1.0, -2.0, 0.5, 3.0]);
    let none = Array::from_slice::<i32>(&[], &[0]).unwrap();
    assert_eq!(s.process(&logits, &none).unwrap().to_vec_f32().unwrap(), [2.0, -1.0, 0.5, 3.0]);
}

#[test]
fn filters_that_leave_one_token_make_sampling_deterministic() {
    // Whatever the key, a row with one finite entry draws that entry.
    let lp = logprobs();
    let d = SamplerConfig::default;
    for cfg in [
        SamplerConfig { temperature: 1.0, top_k: 1, ..d() },
        SamplerConfig { temperature: 0.7, top_p: 0.3, ..d() },
        SamplerConfig { temperature: 2.0, min_p: 0.9, ..d() },
        SamplerConfig { temperature: 0.0, ..d() },
    ] {
        let s = Sampler::new(cfg.clone()).unwrap();
        for seed in 0..4 {
            Sampler::seed(seed).unwrap();
            let ids = s.sample(&lp).unwrap();
            assert_eq!(common::ints64(&ids), [1, 2], "{cfg:?}, seed {seed}");
        }
    }
}

#[test]
fn a_key_sequence_draws_what_the_seeded_global_sequence_draws() {
    // A generation's own keys must replay `mx.random.seed(seed)` followed by draws from the
    // global sequence, draw after draw, so that a seeded row of a batch samples as mlx-lm does.
    let lp = logprobs();
    let s = Sampler::new(SamplerConfig { temperature: 1.0, ..SamplerConfig::default() }).unwrap();
    for seed in [0u64, 7, 12345] {
        Sampler::seed(seed).unwrap();
        let global: Vec<Vec<i64>> = (0..16).map(|_| common::ints64(&s.sample(&lp).unwrap())).collect();
        let mut keys = KeySequence::new(seed).unwrap();
        let own: Vec<Vec<i64>> = (0..16).map(|_| common::ints64(&s.sample_keyed(&lp, &mut keys).unwrap())).collect();
        assert_eq!(own, global, "seed {seed}");
        // The draws vary (a sequence that repeated one key would draw alike every time).
        assert!(global.windows(2).any(|w| w[0] != w[1]), "seed {seed}: {global:?}");
    }
    // Greedy sampling takes no key: the sequence is where it was.
    let greedy = Sampler::new(SamplerConfig::default()).unwrap();
    let mut a = KeySequence::new(3).unwrap();
    let mut b = KeySequence::new(3).unwrap();
    assert_eq!(common::ints64(&greedy.sample_keyed(&lp, &mut a).unwrap()), [1, 2]);
    assert_eq!(
        common::ints64(&s.sample_keyed(&lp, &mut a).unwrap()),
        common::ints64(&s.sample_keyed(&lp, &mut b).unwrap())
    );
}
