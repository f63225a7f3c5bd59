// SPDX-License-Identifier: EUPL-1.2
//! Speculative decoding through the public API: with prompt lookup or a
//! draft model, greedy output is the output of plain decoding token for
//! token (ids, text, log-probabilities) on every tiny fixture and on the real
//! SmolLM2; sampled output follows the model's distribution (a two-sample
//! test against plain sampling on a tiny model); a chat session's turns and a
//! row that shares the batch with another stay exact; the metrics count the
//! guesses; a draft model with another tokenizer, or two ways to draft, are
//! refused at load with the setting named.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use inference_core::{CancelToken, Completion, GenerateSettings, LoadSettings, LogitsMode, Registry, TextModel};

fn settings(options: &[(&str, &str)]) -> LoadSettings {
    let mut s = LoadSettings::default().backend("metal").device(inference_core::Device::Cpu);
    for (k, v) in options {
        s = s.backend_option(*k, *v);
    }
    s
}

fn load(path: &Path, options: &[(&str, &str)]) -> Box<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    reg.load_model(path, &settings(options)).unwrap_or_else(|e| panic!("loading {}: {}", path.display(), e.report()))
}

fn load_err(path: &Path, options: &[(&str, &str)]) -> String {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    match reg.load_model(path, &settings(options)) {
        Ok(_) => panic!("{options:?} loaded"),
        Err(e) => e.report(),
    }
}

/// Prompts whose continuations repeat them (so prompt lookup finds matches) and others.
fn prompts() -> Vec<String> {
    vec![
        "def add(a, b):\n    return a + b\n\ndef add(a, b):\n".to_owned(),
        "once upon a time there was a little town by a river ".repeat(3),
        "The capital of France is".to_owned(),
        "1, 2, 3, 4, 5, 6, 7, 8,".to_owned(),
    ]
}

fn run(model: &dyn TextModel, prompt: &str, s: &GenerateSettings) -> Completion {
    model.generate(prompt, s, CancelToken::new()).unwrap().complete().unwrap()
}

fn ids(c: &Completion) -> Vec<u32> {
    c.tokens.iter().map(|t| t.id).collect()
}

fn assert_same(got: &Completion, plain: &Completion, what: &str) {
    assert_eq!(ids(got), ids(plain), "{what}: token ids");
    assert_eq!(got.text, plain.text, "{what}: text");
    for (a, b) in got.tokens.iter().zip(&plain.tokens) {
        if let (Some(x), Some(y)) = (a.logprob, b.logprob) {
            assert!((x - y).abs() < 1e-3, "{what}: log-prob {x} vs {y}");
        }
    }
}

/// Greedy output of `spec` equals `plain`'s on every prompt; returns the guesses checked and accepted.
fn check_greedy(plain: &dyn TextModel, spec: &dyn TextModel, what: &str) -> (usize, usize) {
    let s = GenerateSettings::default().max_tokens(24).ignore_eos(true).logits(LogitsMode::LogProbs);
    let (mut drafted, mut accepted) = (0, 0);
    for p in prompts() {
        let (want, got) = (run(plain, &p, &s), run(spec, &p, &s));
        assert_eq!(want.tokens.len(), 24, "{what}: {p:?}");
        assert_same(&got, &want, &format!("{what}: {p:?}"));
        let m = got.metrics.expect("metrics");
        assert_eq!(m.generated_tokens, 24, "{what}: {p:?}");
        assert!(m.accepted_draft_tokens <= m.draft_tokens, "{what}: {m:?}");
        assert_eq!(want.metrics.map(|m| m.draft_tokens), Some(0), "{what}: plain decoding guessed");
        (drafted, accepted) = (drafted + m.draft_tokens, accepted + m.accepted_draft_tokens);
    }
    (drafted, accepted)
}

/// A draft model sharing each fixture's tokenizer: itself for one (every guess accepted), a
/// different random model for the others (most rejected).
const DRAFTS: &[(&str, &str)] = &[
    ("llama3-tiny", "llama3-tiny"),
    ("llama-tiny", "gemma3-tiny"),
    ("gemma3-tiny", "llama-tiny"),
    ("llama-tiny-8bit", "llama-tiny"),
    ("qwen3-tiny", "qwen2-tiny"),
    ("qwen2-tiny", "qwen3-tiny-4bit"),
    ("qwen3-tiny-4bit", "qwen3-tiny"),
];

#[test]
fn greedy_output_equals_plain_decoding_on_every_fixture() {
    for &(name, draft) in DRAFTS {
        let path = common::tiny_model(name);
        let plain = load(&path, &[]);
        let lookup = load(&path, &[("prompt_lookup", "3"), ("num_draft_tokens", "4")]);
        let (drafted, accepted) = check_greedy(plain.as_ref(), lookup.as_ref(), &format!("{name}, prompt lookup"));
        assert!(drafted > 0, "{name}: prompt lookup never guessed");
        let load_after = lookup.engine_load().unwrap();
        assert!(load_after.speculative_steps > 0 && load_after.draft_tokens as usize == drafted, "{load_after:?}");
        assert_eq!(load_after.accepted_draft_tokens as usize, accepted, "{name}");
        drop(lookup);
        let draft_dir = common::tiny_model(draft);
        let with_draft = load(&path, &[("draft_model", draft_dir.to_str().unwrap()), ("num_draft_tokens", "3")]);
        let (drafted, accepted) =
            check_greedy(plain.as_ref(), with_draft.as_ref(), &format!("{name}, draft model {draft}"));
        assert!(drafted > 0, "{name}: the draft model never guessed");
        if name == draft {
            assert_eq!(accepted, drafted, "{name}: a model drafting for itself is always right");
        }
    }
}

#[test]
fn a_quantised_kv_cache_trims_back_exactly() {
    // Gemma's heads of 32 take groups of 32; its sliding-window layers stay full precision.
    let path = common::tiny_model("gemma3-tiny");
    let kv: &[(&str, &str)] = &[("kv_bits", "8"), ("kv_group_size", "32"), ("quantized_kv_start", "0")];
    let plain = load(&path, kv);
    let spec = load(&path, &[kv, &[("prompt_lookup", "2"), ("num_draft_tokens", "5")][..]].concat());
    let (drafted, _) = check_greedy(plain.as_ref(), spec.as_ref(), "gemma3-tiny, 8-bit KV cache, prompt lookup");
    assert!(drafted > 0, "prompt lookup never guessed");
}

#[test]
fn greedy_output_equals_plain_decoding_on_smollm2() {
    let Some(dir) = common::real_model("smollm2-135m-instruct") else { return };
    let plain = load(&dir, &[]);
    let lookup = load(&dir, &[("prompt_lookup", "true")]);
    let (drafted, accepted) = check_greedy(plain.as_ref(), lookup.as_ref(), "smollm2, prompt lookup");
    assert!(accepted > 0 && drafted > 0, "SmolLM2 repeats its prompt: {accepted} of {drafted} guesses accepted");
    drop(lookup);
    let Some(draft) = common::real_model("smollm2-135m-instruct-4bit") else { return };
    let with_draft = load(&dir, &[("draft_model", draft.to_str().unwrap())]);
    let (drafted, accepted) = check_greedy(plain.as_ref(), with_draft.as_ref(), "smollm2, 4-bit draft");
    assert!(accepted * 2 > drafted, "the 4-bit model agrees with its source: {accepted} of {drafted}");
}

/// A row keeps its draft model's caches beside its own, so a position costs
/// both in the engine's KV budget.
#[test]
fn the_draft_models_caches_count_in_the_kv_budget() {
    let path = common::tiny_model("qwen3-tiny");
    let plain = load(&path, &[]).engine_load().unwrap().kv_bytes_per_token;
    let lookup = load(&path, &[("prompt_lookup", "true")]).engine_load().unwrap().kv_bytes_per_token;
    let drafted = load(&path, &[("draft_model", path.to_str().unwrap())]).engine_load().unwrap().kv_bytes_per_token;
    assert!(plain > 0);
    assert_eq!(lookup, plain, "prompt lookup holds no caches of its own");
    assert_eq!(drafted, 2 * plain, "a model drafting for itself doubles what a position costs");
}

/// Sampled output follows the model's distribution: the second and third tokens sampled with
/// speculation (a model drafting for itself, so that its guess is its most likely token and is
/// accepted about as often as that token is drawn) against plain sampling, seeds 0..N on each
/// side, compared by a chi-square test of homogeneity over the tokens seen. The seeds are fixed,
/// so the test is deterministic; a wrong acceptance rule (every guess taken, say) moves the
/// counts far past the threshold.
#[test]
fn sampled_output_follows_the_models_distribution() {
    const N: u64 = 400;
    let path = common::tiny_model("qwen3-tiny");
    let plain = load(&path, &[]);
    let spec = load(&path, &[("draft_model", path.to_str().unwrap()), ("num_draft_tokens", "2")]);
    let sample = |model: &dyn TextModel, seed: u64| {
        let s = GenerateSettings::default().max_tokens(3).temperature(1.0).top_k(4).seed(seed).ignore_eos(true);
        let c = run(model, "a b c", &s);
        (c.tokens[1].id, c.tokens[2].id, c.metrics.unwrap())
    };
    let (mut second, mut third) = (BTreeMap::<u32, [f64; 2]>::new(), BTreeMap::<u32, [f64; 2]>::new());
    let (mut drafted, mut accepted) = (0, 0);
    for seed in 0..N {
        for (side, model) in [plain.as_ref(), spec.as_ref()].into_iter().enumerate() {
            let (b, c, m) = sample(model, seed);
            second.entry(b).or_default()[side] += 1.0;
            third.entry(c).or_default()[side] += 1.0;
            drafted += m.draft_tokens;
            accepted += m.accepted_draft_tokens;
        }
    }
    assert!(drafted > 0 && accepted > 0 && accepted < drafted, "both outcomes seen: {accepted} of {drafted}");
    for (what, counts) in [("second token", &second), ("third token", &third)] {
        let (stat, df) = chi_square(counts);
        // The 0.999 quantile of chi-square with df degrees of freedom (Wilson–Hilferty), about 3.1σ.
        let z = 3.09;
        let d = df as f64;
        let limit = d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3);
        assert!(df >= 1, "{what}: only one token was ever drawn: {counts:?}");
        assert!(
            stat < limit,
            "{what}: chi-square {stat:.1} over {df} degrees of freedom (limit {limit:.1}): {counts:?}"
        );
    }
}

/// Pearson's chi-square statistic of a 2 × K table of counts, and its degrees of freedom.
fn chi_square(counts: &BTreeMap<u32, [f64; 2]>) -> (f64, usize) {
    let totals = [0, 1].map(|s| counts.values().map(|c| c[s]).sum::<f64>());
    let all = totals[0] + totals[1];
    let stat = counts
        .values()
        .flat_map(|c| {
            let row = c[0] + c[1];
            (0..2).map(move |s| (c[s], row * totals[s] / all))
        })
        .map(|(seen, expected)| (seen - expected).powi(2) / expected)
        .sum();
    (stat, counts.len().saturating_sub(1))
}

#[test]
fn a_chat_session_and_a_shared_batch_stay_exact() {
    let path = common::tiny_model("gemma3-tiny");
    let plain = load(&path, &[]);
    let spec = load(&path, &[("prompt_lookup", "2")]);
    let s = GenerateSettings::default().max_tokens(16).ignore_eos(true);
    let turns = |model: &dyn TextModel| {
        let mut session = model.new_session().unwrap();
        let (mut text, mut out) = (String::from("say a b a b a b"), Vec::new());
        for more in [" and again: a b a b", " once more"] {
            let c = session.generate(&text, &s, CancelToken::new()).unwrap().complete().unwrap();
            text = format!("{text}{}{more}", c.text);
            out.push((ids(&c), c.metrics.unwrap().draft_tokens));
        }
        (out, session.cached_tokens().unwrap())
    };
    let ((want, held), (got, spec_held)) = (turns(plain.as_ref()), turns(spec.as_ref()));
    assert_eq!(spec_held, held, "the session's cache holds the same tokens");
    for ((w, _), (g, drafted)) in want.iter().zip(&got) {
        assert_eq!(g, w, "a session's turn with speculation");
        assert!(*drafted > 0, "the session's turn never guessed");
    }
    // Two requests at once: they share the batch (decoding plainly) and each equals its run alone.
    let long = GenerateSettings::default().max_tokens(40).ignore_eos(true);
    let p = prompts();
    let alone = [run(plain.as_ref(), &p[0], &long), run(plain.as_ref(), &p[1], &long)];
    let mut first = spec.generate(&p[0], &long, CancelToken::new()).unwrap();
    let head: Vec<_> = first.by_ref().take(2).map(|t| t.unwrap()).collect();
    let second = run(spec.as_ref(), &p[1], &long);
    let mut tokens = head;
    tokens.extend(first.by_ref().map(|t| t.unwrap()));
    assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), ids(&alone[0]), "the row that speculated first");
    assert_eq!(ids(&second), ids(&alone[1]), "the row that joined it");
    assert!(spec.engine_load().unwrap().peak_batch_size >= 2, "the two requests shared a step");
}

#[test]
fn a_draft_model_must_share_the_tokenizer_and_one_way_to_draft_is_chosen() {
    let path = common::tiny_model("qwen3-tiny");
    let other = common::tiny_model("llama3-tiny");
    let e = load_err(&path, &[("draft_model", other.to_str().unwrap())]);
    assert!(e.contains("draft_model") && e.contains("different tokenizer"), "{e}");
    let e = load_err(&path, &[("draft_model", "/nonexistent/draft")]);
    assert!(e.contains("draft_model") && e.contains("/nonexistent/draft"), "{e}");
    let e = load_err(&path, &[("draft_model", path.to_str().unwrap()), ("prompt_lookup", "true")]);
    assert!(e.contains("choose one"), "{e}");
    let e = load_err(&path, &[("num_draft_tokens", "3")]);
    assert!(e.contains("num_draft_tokens"), "{e}");
}
