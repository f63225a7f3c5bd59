// SPDX-License-Identifier: EUPL-1.2
//! The harness against the committed goldens: they all parse and are fresh, an exact replay of
//! mlx-lm's outputs passes, and a perturbed replay fails at the right place with the right gap.

use std::collections::HashMap;

use parity::{
    BoxError, ChatMessage, ChatRenderer, Divergence, Fixture, Gap, Golden, Greedy, GreedyOutcome, GreedyRun, Kind,
    ParityError, ParityModel, ParityTokenizer, Sequence, TokenizerFixture, Tolerances,
};

/// A backend that plays back a golden's own outputs, with optional edits.
struct Replay {
    rows: HashMap<Vec<u32>, Vec<Vec<f32>>>,
    greedy: HashMap<Vec<u32>, (Vec<u32>, Vec<f32>)>,
    with_logprobs: bool,
}

impl Replay {
    fn of(fixture: &Fixture) -> Self {
        let rows = fixture
            .golden
            .sequences
            .iter()
            .map(|s| (s.tokens.clone(), s.logits.clone().expect("tiny goldens have full logits")))
            .collect();
        let greedy =
            fixture.golden.greedy.iter().map(|g| (g.prompt.clone(), (g.tokens.clone(), g.logprobs.clone()))).collect();
        Replay { rows, greedy, with_logprobs: true }
    }
}

impl ParityModel for Replay {
    fn logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, BoxError> {
        self.rows.get(tokens).cloned().ok_or_else(|| "no such sequence in the replay".into())
    }

    fn greedy(&mut self, prompt: &[u32], n: usize) -> Result<Greedy, BoxError> {
        let (tokens, logprobs) = self.greedy.get(prompt).cloned().ok_or("no such prompt in the replay")?;
        assert_eq!(n, tokens.len());
        Ok(Greedy { tokens, logprobs: self.with_logprobs.then_some(logprobs) })
    }
}

fn tiny(name: &str) -> Fixture {
    Fixture::load(name).unwrap_or_else(|e| panic!("{e}"))
}

fn single_divergence(fixture: &Fixture, model: &mut Replay) -> Divergence {
    let report = parity::check_model(fixture, model).unwrap();
    assert_eq!(report.divergences.len(), 1, "{report}");
    report.divergences[0].clone()
}

#[test]
fn every_golden_parses() {
    let files = parity::golden_files().unwrap();
    let (mut models, mut tokenizers) = (0, 0);
    for path in &files {
        match Golden::load(path).unwrap_or_else(|e| panic!("{e}")) {
            Golden::Model(g) => {
                models += 1;
                assert_eq!(g.versions.mlx, "0.32.4", "{}", path.display());
                assert_eq!(g.versions.mlx_lm, "0.32.2", "{}", path.display());
                assert!(!g.sequences.is_empty() && !g.greedy.is_empty(), "{}", path.display());
                for run in &g.greedy {
                    assert_eq!(run.tokens.len(), 32, "{}: greedy runs are 32 tokens", path.display());
                }
                match g.kind {
                    Kind::Tiny => assert!(g.sequences.iter().all(|s| s.logits.is_some())),
                    Kind::Real => {
                        for s in &g.sequences {
                            let (top, sums) = (s.top_k.as_ref().unwrap(), s.checksums.as_ref().unwrap());
                            assert_eq!(top.k, 10);
                            for (pos, c) in sums.iter().enumerate() {
                                assert_eq!(c.argmax, top.ids[pos][0], "{} {} {pos}", path.display(), s.name);
                                assert_eq!(c.max, f64::from(top.values[pos][0]), "{} {} {pos}", path.display(), s.name);
                            }
                        }
                    }
                }
            }
            Golden::Tokenizer(g) => {
                tokenizers += 1;
                assert!(
                    g.cases.iter().any(|c| c.text.is_empty()),
                    "{}: the corpus has the empty string",
                    path.display()
                );
            }
        }
    }
    assert!(models >= 8 && tokenizers >= 3, "{models} model and {tokenizers} tokenizer goldens in {files:?}");
}

#[test]
fn tiny_fixtures_cover_the_planned_variants() {
    let names = parity::tiny_fixture_names().unwrap();
    for want in [
        "gemma3-tiny",
        "gemma3-tiny-mm",
        "qwen3-tiny",
        "qwen3-tiny-4bit",
        "qwen2-tiny",
        "llama-tiny",
        "llama-tiny-8bit",
        "llama3-tiny",
    ] {
        assert!(names.iter().any(|n| n == want), "no golden for {want} in {names:?}");
    }
    let dtypes: Vec<(String, Option<u32>)> = names
        .iter()
        .map(|n| {
            let g = tiny(n).golden;
            (g.dtype, g.quantization.map(|q| q.bits))
        })
        .collect();
    for (dtype, bits) in [("bfloat16", None), ("float32", None), ("bfloat16", Some(4)), ("float32", Some(8))] {
        assert!(dtypes.iter().any(|(d, b)| d == dtype && *b == bits), "no {dtype} {bits:?} variant: {dtypes:?}");
    }
    // Gemma's sliding window is shorter than one of its sequences.
    let gemma = tiny("gemma3-tiny");
    assert!(gemma.golden.sequences.iter().any(|s| s.tokens.len() > 8));
}

#[test]
fn tiny_goldens_are_fresh_and_their_models_present() {
    for name in parity::tiny_fixture_names().unwrap() {
        let f = tiny(&name);
        for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            assert!(f.model_dir.join(file).is_file(), "{name}: {file} missing");
        }
    }
    for name in parity::tokenizer_names(Kind::Tiny).unwrap() {
        TokenizerFixture::load(&name).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn the_multimodal_wrapper_gives_the_same_logits() {
    let (a, b) = (tiny("gemma3-tiny").golden, tiny("gemma3-tiny-mm").golden);
    assert_eq!(b.model_type, "gemma3");
    for (x, y) in a.sequences.iter().zip(&b.sequences) {
        assert_eq!(x.logits, y.logits, "sequence {}", x.name);
    }
}

#[test]
fn an_exact_replay_passes_every_tiny_fixture() {
    for name in parity::tiny_fixture_names().unwrap() {
        let f = tiny(&name);
        let report = parity::check_model(&f, &mut Replay::of(&f)).unwrap();
        assert!(report.is_ok() && report.notes.is_empty(), "{report}");
        assert_eq!(report.checked, f.golden.sequences.len() + f.golden.greedy.len());
        report.into_result().unwrap();
    }
}

#[test]
fn a_perturbed_logit_fails_at_its_position_with_its_gap() {
    let f = tiny("llama-tiny");
    let seq = f.golden.sequences.iter().find(|s| s.name == "pangram").unwrap();
    let mut model = Replay::of(&f);
    let rows = model.rows.get_mut(&seq.tokens).unwrap();
    rows[5][17] += 0.5; // the first divergence
    rows[9][3] -= 2.0; // a larger one later
    rows[9][4] += 0.25;
    let d = single_divergence(&f, &mut model);
    assert_eq!(
        (d.fixture.as_str(), d.check.as_str(), d.case.as_str(), d.position),
        ("llama-tiny", "logits", "pangram", 5)
    );
    assert_eq!(d.input_token, Some(seq.tokens[5]));
    let Gap::Value { vocab_id, expected, actual, gap, allowed } = d.gap.clone() else { panic!("{d}") };
    assert_eq!(vocab_id, Some(17));
    assert!((gap - 0.5).abs() < 1e-5 && (actual - expected - 0.5).abs() < 1e-5, "{d}");
    assert!(allowed < 0.01, "f32 tolerance: {allowed}");
    let text = d.to_string();
    for part in
        ["llama-tiny", "pangram", "position 5", "vocab id 17", "2 of", "largest gap 2.000e0 at position 9 (vocab id 3)"]
    {
        assert!(text.contains(part), "`{part}` not in: {text}");
    }
}

#[test]
fn a_gap_within_tolerance_passes() {
    let f = tiny("qwen3-tiny"); // bf16: 0.05 + 2% allowed
    let seq = &f.golden.sequences[0];
    let mut model = Replay::of(&f);
    let rows = model.rows.get_mut(&seq.tokens).unwrap();
    rows[0][0] += 0.04;
    assert!(parity::check_model(&f, &mut model).unwrap().is_ok());
    let tol = Tolerances::for_golden(&f.golden);
    let rows = model.rows.get_mut(&seq.tokens).unwrap();
    rows[0][0] += 1.0;
    let report = parity::check_model_with(&f, &mut model, &tol).unwrap();
    assert_eq!(report.divergences[0].position, 0);
}

#[test]
fn a_nan_is_always_a_divergence() {
    let f = tiny("gemma3-tiny");
    let seq = &f.golden.sequences[1];
    let mut model = Replay::of(&f);
    model.rows.get_mut(&seq.tokens).unwrap()[3][100] = f32::NAN;
    let d = single_divergence(&f, &mut model);
    assert_eq!((d.case.as_str(), d.position), (seq.name.as_str(), 3));
    assert!(matches!(d.gap, Gap::Value { vocab_id: Some(100), gap, .. } if gap.is_infinite()), "{d}");
}

#[test]
fn wrong_shapes_are_reported() {
    let f = tiny("qwen2-tiny");
    let seq = &f.golden.sequences[0];
    let mut model = Replay::of(&f);
    model.rows.get_mut(&seq.tokens).unwrap().pop();
    let d = single_divergence(&f, &mut model);
    assert_eq!(d.gap, Gap::Shape { expected: seq.tokens.len(), actual: seq.tokens.len() - 1 });

    let mut model = Replay::of(&f);
    model.rows.get_mut(&seq.tokens).unwrap()[2].truncate(300);
    let d = single_divergence(&f, &mut model);
    assert_eq!((d.position, d.gap.clone()), (2, Gap::Shape { expected: f.golden.vocab_size, actual: 300 }));
}

fn first_confident_step(run: &GreedyRun, tol: &Tolerances, from: usize) -> usize {
    (from..run.tokens.len()).find(|&i| f64::from(run.margins[i]) > tol.tie).expect("a step that is not a near tie")
}

#[test]
fn a_greedy_mismatch_names_the_first_differing_step() {
    let f = tiny("llama3-tiny");
    let tol = Tolerances::for_golden(&f.golden);
    let run = &f.golden.greedy[1];
    let step = first_confident_step(run, &tol, 3);
    let mut model = Replay::of(&f);
    let entry = model.greedy.get_mut(&run.prompt).unwrap();
    let wrong = (entry.0[step] + 1) % u32::try_from(f.golden.vocab_size).unwrap();
    entry.0[step] = wrong;
    entry.0[step + 2] = wrong; // later differences are not the first
    let d = single_divergence(&f, &mut model);
    assert_eq!((d.check.as_str(), d.case.as_str(), d.position), ("greedy", run.name.as_str(), step));
    assert_eq!(
        d.gap,
        Gap::Token {
            expected: Some(run.tokens[step]),
            actual: Some(wrong),
            margin: Some(f64::from(run.margins[step]))
        }
    );
    let text = d.to_string();
    assert!(
        text.contains(&format!("position {step}")) && text.contains(&format!("the first {step} tokens match")),
        "{text}"
    );
}

#[test]
fn a_greedy_divergence_at_a_near_tie_is_forgiven() {
    let f = tiny("qwen2-tiny");
    let tol = Tolerances::for_golden(&f.golden);
    let mut run = f.golden.greedy[0].clone();
    run.margins[4] = 1e-5;
    let mut tokens = run.tokens.clone();
    tokens[4] += 1;
    tokens[10] += 1;
    let outcome = parity::compare_greedy("qwen2-tiny", &run, &Greedy::from(tokens), &tol).unwrap();
    assert_eq!(outcome, GreedyOutcome::NearTie { step: 4, margin: 1e-5f32 as f64 });
    assert_eq!(
        parity::compare_greedy("qwen2-tiny", &run, &Greedy::from(run.tokens.clone()), &tol).unwrap(),
        GreedyOutcome::Identical
    );
}

#[test]
fn greedy_logprobs_catch_a_drift_before_any_token_differs() {
    let f = tiny("gemma3-tiny");
    let run = &f.golden.greedy[0];
    let mut model = Replay::of(&f);
    model.greedy.get_mut(&run.prompt).unwrap().1[6] -= 1.0;
    let d = single_divergence(&f, &mut model);
    assert_eq!((d.check.as_str(), d.position), ("greedy", 6));
    assert!(matches!(d.gap, Gap::Value { gap, .. } if (gap - 1.0).abs() < 1e-6), "{d}");
    // Without logprobs only the tokens are compared.
    model.with_logprobs = false;
    assert!(parity::check_model(&f, &mut model).unwrap().is_ok());
}

#[test]
fn a_short_greedy_run_is_reported() {
    let f = tiny("llama-tiny");
    let run = &f.golden.greedy[0];
    let tol = Tolerances::for_golden(&f.golden);
    let d = parity::compare_greedy("llama-tiny", run, &Greedy::from(run.tokens[..20].to_vec()), &tol).unwrap_err();
    assert_eq!(
        (d.position, d.gap.clone()),
        (20, Gap::Token { expected: Some(run.tokens[20]), actual: None, margin: None })
    );
}

#[test]
fn backend_errors_name_the_fixture_and_case() {
    struct Broken;
    impl ParityModel for Broken {
        fn logits(&mut self, _: &[u32]) -> Result<Vec<Vec<f32>>, BoxError> {
            Err("out of memory".into())
        }
        fn greedy(&mut self, _: &[u32], _: usize) -> Result<Greedy, BoxError> {
            Ok(Greedy::default())
        }
    }
    let f = tiny("qwen3-tiny");
    let err = parity::check_model(&f, &mut Broken).unwrap_err();
    assert!(matches!(err, ParityError::Backend { .. }));
    assert_eq!(err.to_string(), "qwen3-tiny / short: the backend failed: out of memory");
}

#[test]
fn a_missing_fixture_says_how_to_make_it() {
    let err = Fixture::load("no-such-model").unwrap_err();
    assert!(err.to_string().contains("run `cargo xtask fixtures`"), "{err}");
}

// --- real-model goldens: top-k semantics on rows rebuilt from the golden --------------------

/// Full rows consistent with a real golden's top-k: the top-k values where recorded, the rest
/// spread below the k-th value. Checksums are not consistent with these rows, so the check uses
/// a sequence whose checksums are recomputed from them.
fn rows_from_top_k(seq: &Sequence, vocab: usize) -> (Sequence, Vec<Vec<f32>>) {
    let top = seq.top_k.as_ref().unwrap();
    let rows: Vec<Vec<f32>> = top
        .ids
        .iter()
        .zip(&top.values)
        .map(|(ids, values)| {
            let floor = values[values.len() - 1] - 1.0;
            let mut row: Vec<f32> = (0..vocab).map(|i| floor - (i % 97) as f32 * 0.01).collect();
            for (&id, &v) in ids.iter().zip(values) {
                row[id as usize] = v;
            }
            row
        })
        .collect();
    let mut rebuilt = seq.clone();
    rebuilt.checksums = Some(rows.iter().map(|r| parity::row_checksums(r)).collect());
    (rebuilt, rows)
}

fn real_golden() -> parity::ModelGolden {
    // Parsing the committed golden needs no model; the rows are rebuilt from it.
    parity::ModelGolden::load(&parity::golden_path("smollm2-135m-instruct")).unwrap()
}

#[test]
fn top_k_replay_passes_and_perturbations_fail_where_made() {
    let g = real_golden();
    let tol = Tolerances::for_golden(&g);
    let seq = &g.sequences[0];
    let (seq, rows) = rows_from_top_k(seq, g.vocab_size);
    assert!(parity::compare_logits("smollm2", &seq, &rows, &tol).is_ok());

    // One of the top-k values is off at position 4.
    let top = seq.top_k.as_ref().unwrap();
    let mut bad = rows.clone();
    let id = top.ids[4][3] as usize;
    bad[4][id] -= 1.5;
    let d = parity::compare_logits("smollm2", &seq, &bad, &tol).unwrap_err();
    assert_eq!((d.check.as_str(), d.position), ("top-k", 4));
    assert!(
        matches!(d.gap, Gap::Value { vocab_id: Some(v), gap, .. } if v as usize == id && (gap - 1.5).abs() < 1e-3),
        "{d}"
    );

    // Everything outside the top-k shifted: the top-k agree, the checksums do not.
    let mut shifted = rows.clone();
    for (i, x) in shifted[2].iter_mut().enumerate() {
        if !top.ids[2].contains(&(i as u32)) {
            *x += 3.0;
        }
    }
    let d = parity::compare_logits("smollm2", &seq, &shifted, &tol).unwrap_err();
    assert_eq!((d.check.as_str(), d.position), ("checksum mean", 2), "{d}");
}

#[test]
fn top_1_near_ties_are_forgiven_and_real_disagreements_are_not() {
    let g = real_golden();
    let tol = Tolerances::for_golden(&g);
    let (seq, rows) = rows_from_top_k(&g.sequences[1], g.vocab_size);
    let top = seq.top_k.as_ref().unwrap();
    // Find a position whose best two are far apart, and one we can make a near tie.
    let far = (0..rows.len()).find(|&p| f64::from(top.values[p][0] - top.values[p][1]) > tol.tie + 1.0).unwrap();
    let mut swapped = rows.clone();
    let (a, b) = (top.ids[far][0] as usize, top.ids[far][1] as usize);
    swapped[far].swap(a, b);
    let d = parity::compare_logits("smollm2", &seq, &swapped, &tol).unwrap_err();
    assert_eq!((d.check.as_str(), d.position), ("top-1", far));
    assert!(
        matches!(d.gap, Gap::Token { expected: Some(e), actual: Some(x), .. } if e as usize == a && x as usize == b),
        "{d}"
    );

    // The second-best nudged just above the best, by less than the tie tolerance: forgiven at
    // top-1, and the values stay within the logits tolerance.
    let mut tie = seq.clone();
    let mut tied_rows = rows.clone();
    let t = tie.top_k.as_mut().unwrap();
    t.values[far][1] = t.values[far][0] - 0.01;
    tied_rows[far][b] = t.values[far][0] + 0.01;
    tie.checksums = Some(tied_rows.iter().map(|r| parity::row_checksums(r)).collect());
    let mut loose = tol;
    loose.logits = parity::Tolerance::new(0.05, 0.0);
    assert!(parity::compare_logits("smollm2", &tie, &tied_rows, &loose).is_ok());
}

// --- tokenizers and chat templates ------------------------------------------------------------

/// A tokenizer that answers from a golden.
struct TokReplay {
    by_text: HashMap<String, parity::TokenizerCase>,
    decode_plain: HashMap<Vec<u32>, (String, String)>,
}

impl TokReplay {
    fn of(g: &parity::TokenizerGolden) -> Self {
        TokReplay {
            by_text: g.cases.iter().map(|c| (c.text.clone(), c.clone())).collect(),
            decode_plain: g
                .cases
                .iter()
                .map(|c| (c.ids_with_special.clone(), (c.decoded.clone(), c.decoded_skip_special.clone())))
                .collect(),
        }
    }
}

impl ParityTokenizer for TokReplay {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, BoxError> {
        let c = self.by_text.get(text).ok_or("unknown text")?;
        Ok(if add_special_tokens { c.ids_with_special.clone() } else { c.ids.clone() })
    }
    fn decode(&self, ids: &[u32], skip: bool) -> Result<String, BoxError> {
        let (a, b) = self.decode_plain.get(ids).cloned().ok_or("unknown ids")?;
        Ok(if skip { b } else { a })
    }
    fn tokens(&self, text: &str) -> Result<Option<Vec<String>>, BoxError> {
        Ok(self.by_text.get(text).map(|c| c.tokens.clone()))
    }
}

#[test]
fn tokenizer_replay_passes_and_a_wrong_id_is_located() {
    for name in parity::tokenizer_names(Kind::Tiny).unwrap() {
        let f = TokenizerFixture::load(&name).unwrap();
        let report = parity::check_tokenizer(&f.golden, &TokReplay::of(&f.golden)).unwrap();
        assert!(report.is_ok(), "{report}");
    }
    let f = TokenizerFixture::load("tiny-spm").unwrap();
    let mut tok = TokReplay::of(&f.golden);
    let text = "The quick brown fox jumps over the lazy dog.";
    tok.by_text.get_mut(text).unwrap().ids[3] = 0;
    let report = parity::check_tokenizer(&f.golden, &tok).unwrap();
    assert_eq!(report.divergences.len(), 1, "{report}");
    let d = &report.divergences[0];
    assert_eq!((d.check.as_str(), d.case.as_str(), d.position), ("encode", format!("{text:?}").as_str(), 3));
}

struct ChatReplay(HashMap<String, String>);

impl ChatRenderer for ChatReplay {
    fn render(&self, messages: &[ChatMessage], _: bool) -> Result<String, BoxError> {
        let key: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        self.0.get(&key.join("\u{1}")).cloned().ok_or_else(|| "unknown conversation".into())
    }
}

#[test]
fn chat_replay_passes_and_a_wrong_render_is_located() {
    let f = tiny("qwen3-tiny");
    assert_eq!(f.golden.chat.len(), 3);
    let key = |c: &parity::ChatCase| c.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\u{1}");
    let mut renders: HashMap<String, String> = f.golden.chat.iter().map(|c| (key(c), c.text.clone())).collect();
    let tok_golden = TokenizerFixture::load("tiny-chatml").unwrap().golden;
    let mut tok = TokReplay::of(&tok_golden);
    for c in &f.golden.chat {
        let case = parity::TokenizerCase {
            text: c.text.clone(),
            ids: c.ids.clone(),
            tokens: vec![String::new(); c.ids.len()],
            ids_with_special: c.ids.clone(),
            decoded: c.text.clone(),
            decoded_skip_special: String::new(),
        };
        tok.by_text.insert(c.text.clone(), case);
    }
    assert!(parity::check_chat(&f, &ChatReplay(renders.clone()), &tok).unwrap().is_ok());

    let first = &f.golden.chat[0];
    let wrong = first.text.replacen("<|im_start|>assistant", "<|im_start|>model", 1);
    renders.insert(key(first), wrong);
    let report = parity::check_chat(&f, &ChatReplay(renders), &tok).unwrap();
    assert_eq!(report.divergences.len(), 1, "{report}");
    let d = &report.divergences[0];
    assert_eq!((d.check.as_str(), d.case.as_str()), ("chat template", first.name.as_str()));
    assert_eq!(d.position, first.text.find("<|im_start|>assistant").unwrap() + "<|im_start|>".len());
}

// --- real models: present (CI) or skipped with a note ---------------------------------------------

#[test]
fn real_fixtures_are_present_or_skipped() {
    for name in parity::real_fixture_names().unwrap() {
        let Some(f) = parity::real_fixture(&name).unwrap_or_else(|e| panic!("{e}")) else { continue };
        assert!(f.model_dir.join("model.safetensors").is_file(), "{name}");
        let bits = f.golden.quantization.map(|q| q.bits);
        assert_eq!(name.ends_with("-4bit"), bits == Some(4), "{name}");
        assert_eq!(name.ends_with("-8bit"), bits == Some(8), "{name}");
    }
    for name in parity::tokenizer_names(Kind::Real).unwrap() {
        if let Some(f) = parity::real_tokenizer_fixture(&name).unwrap_or_else(|e| panic!("{e}")) {
            assert!(f.tokenizer_file.is_file());
        }
    }
}
