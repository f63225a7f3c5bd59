// SPDX-License-Identifier: EUPL-1.2
//! Parity with mlx-lm, the reference implementation: the harness that backends plug into.
//!
//! `cargo xtask fixtures` writes golden outputs of mlx-lm into `testdata/golden/` for tiny random
//! models (committed under `testdata/models/`) and for real small models (converted into the
//! models cache, `~/.cache/mlxr/models`). This crate reads them, runs a backend on the same
//! inputs, compares with tolerances per dtype, and on failure says where the backend left the
//! reference first, and by how much.
//!
//! # Plugging a backend in
//!
//! Implement [`ParityModel`] for a loaded model (and [`ParityTokenizer`] / [`ChatRenderer`] for
//! its tokenizer and chat template), then in a test:
//!
//! ```no_run
//! # use parity::{BoxError, Fixture, Greedy, ParityModel};
//! # struct MyModel;
//! # impl ParityModel for MyModel {
//! #     fn logits(&mut self, _: &[u32]) -> Result<Vec<Vec<f32>>, BoxError> { Ok(Vec::new()) }
//! #     fn greedy(&mut self, _: &[u32], _: usize) -> Result<Greedy, BoxError> { Ok(Greedy::from(Vec::new())) }
//! # }
//! # fn load(_: &std::path::Path) -> MyModel { MyModel }
//! for name in parity::tiny_fixture_names()? {
//!     let fixture = Fixture::load(&name)?;
//!     let mut model = load(&fixture.model_dir);
//!     parity::check_model(&fixture, &mut model)?.into_result()?;
//! }
//! // Real models: skipped with a note when absent, unless MLXR_REQUIRE_REAL_MODELS=1.
//! if let Some(fixture) = parity::real_fixture("smollm2-135m-instruct")? {
//!     let mut model = load(&fixture.model_dir);
//!     parity::check_model(&fixture, &mut model)?.into_result()?;
//! }
//! # Ok::<(), parity::ParityError>(())
//! ```
//!
//! # What is compared
//!
//! - Tiny models: every logit of every position of each golden sequence.
//! - Real models: per position, the top-1 id (near ties forgiven), the logits of mlx-lm's top 10
//!   ids, and the row's mean, root mean square, min, max and logsumexp (see [`compare_top_k`]).
//! - Greedy continuations of 32 tokens with EOS ignored (see [`compare_greedy`]).
//! - Tokenizers: encode with and without special tokens, token strings, decode with and without
//!   skipping special tokens ([`check_tokenizer`]); chat templates rendered and encoded
//!   ([`check_chat`]).
//!
//! Tolerances are in [`Tolerances`]; the file formats and the pipeline in `testdata/README.md`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod compare;
#[cfg(feature = "fuzz")]
pub mod fuzz;
mod golden;
mod locate;

use std::path::PathBuf;

pub use compare::{
    Divergence, Gap, Greedy, GreedyOutcome, Tolerance, Tolerances, compare_greedy, compare_ids, compare_logits,
    compare_text, compare_top_k, row_checksums,
};
pub use golden::{
    ChatCase, ChatMessage, Golden, GreedyRun, Kind, KvQuantRun, MODEL_FORMAT, ModelGolden, Quantization, RowChecksums,
    SampledRun, Sequence, TOKENIZER_FORMAT, TokenizerCase, TokenizerGolden, TopK, Versions,
};
pub use locate::{
    Fixture, MODELS_PLACEHOLDER, REAL_MODEL_STAMP, REQUIRE_REAL_MODELS_ENV, TokenizerFixture, golden_dir, golden_files,
    golden_path, models_dir, real_fixture, real_fixture_names, real_models_required, real_tokenizer_fixture,
    resolve_recorded, stale_files, testdata_dir, tiny_fixture_names, tokenizer_names, workspace_root,
};

/// The error type backends return through the traits.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A model as the harness drives it. Each call starts from an empty cache.
pub trait ParityModel {
    /// The logits of every position of `tokens`, from one forward pass (a prefill) through a fresh
    /// cache: one row of `vocab_size` values per token, as float32 whatever the model's dtype.
    ///
    /// # Errors
    /// Whatever the backend fails with.
    fn logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, BoxError>;

    /// `n` tokens of greedy (argmax) continuation of `prompt`, ignoring EOS, as mlx-lm's
    /// `generate_step` does: prefill the prompt, then one token at a time through the cache.
    /// Return [`Greedy::logprobs`] too when the backend has them.
    ///
    /// # Errors
    /// Whatever the backend fails with.
    fn greedy(&mut self, prompt: &[u32], n: usize) -> Result<Greedy, BoxError>;
}

/// A tokenizer as the harness drives it.
pub trait ParityTokenizer {
    /// Encodes `text`, adding the tokenizer's special tokens (e.g. BOS) when asked.
    ///
    /// # Errors
    /// Whatever the tokenizer fails with.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, BoxError>;

    /// Decodes `ids`, leaving special tokens out when asked.
    ///
    /// # Errors
    /// Whatever the tokenizer fails with.
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, BoxError>;

    /// The token strings of `encode(text, false)`, when the tokenizer exposes them; `None`
    /// (the default) skips that comparison.
    ///
    /// # Errors
    /// Whatever the tokenizer fails with.
    fn tokens(&self, text: &str) -> Result<Option<Vec<String>>, BoxError> {
        let _ = text;
        Ok(None)
    }
}

/// A chat template as the harness drives it.
pub trait ChatRenderer {
    /// Renders `messages` with the model's template, as `apply_chat_template(messages,
    /// add_generation_prompt=..., tokenize=False)` does.
    ///
    /// # Errors
    /// Whatever the template engine fails with.
    fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, BoxError>;
}

/// A fixture that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A golden, model or tokenizer file is not there.
    #[error("{what} is missing; run `cargo xtask fixtures`")]
    Missing {
        /// What is missing, with its path.
        what: String,
    },
    /// No models cache directory could be worked out.
    #[error("no models directory: set MLXR_MODELS_DIR (or HOME) and run `cargo xtask fixtures`")]
    NoModelsDir,
    /// The model files changed since the golden was made.
    #[error("{} is stale: {} changed since it was made; run `cargo xtask fixtures`", golden.display(), files.join(", "))]
    Stale {
        /// The golden file.
        golden: PathBuf,
        /// The model files whose sha256 differs.
        files: Vec<String>,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Why a parity check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// The fixture could not be used.
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    /// The backend failed to run a case.
    #[error("{fixture} / {case}: the backend failed: {source}")]
    Backend {
        /// The fixture.
        fixture: String,
        /// The case it was running.
        case: String,
        /// The backend's error.
        source: BoxError,
    },
    /// The backend ran but diverged from mlx-lm.
    #[error("{0}")]
    Mismatch(Report),
}

/// The outcome of the checks on one fixture.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The fixture.
    pub fixture: String,
    /// How many cases were compared.
    pub checked: usize,
    /// Things that passed with a remark (greedy runs that stopped at a near tie).
    pub notes: Vec<String>,
    /// Every failed case, each with its first divergence.
    pub divergences: Vec<Divergence>,
}

impl Report {
    /// A report with nothing checked yet.
    pub fn new(fixture: &str) -> Self {
        Report { fixture: fixture.to_string(), ..Report::default() }
    }

    /// Whether every case passed.
    pub fn is_ok(&self) -> bool {
        self.divergences.is_empty()
    }

    /// `Ok(self)` when every case passed, otherwise [`ParityError::Mismatch`].
    ///
    /// # Errors
    /// Some case diverged.
    pub fn into_result(self) -> Result<Report, ParityError> {
        if self.is_ok() { Ok(self) } else { Err(ParityError::Mismatch(self)) }
    }

    fn record(&mut self, outcome: Result<(), Box<Divergence>>) {
        self.checked += 1;
        if let Err(d) = outcome {
            self.divergences.push(*d);
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_ok() {
            write!(f, "{}: parity with mlx-lm ({} cases)", self.fixture, self.checked)?;
        } else {
            write!(f, "{}: {} of {} cases diverge from mlx-lm", self.fixture, self.divergences.len(), self.checked)?;
            for d in &self.divergences {
                write!(f, "\n  - {d}")?;
            }
        }
        for n in &self.notes {
            write!(f, "\n  note: {n}")?;
        }
        Ok(())
    }
}

fn backend(fixture: &str, case: &str) -> impl FnOnce(BoxError) -> ParityError {
    let (fixture, case) = (fixture.to_string(), case.to_string());
    move |source| ParityError::Backend { fixture, case, source }
}

/// Runs a model on every sequence and greedy prompt of a fixture and compares with mlx-lm, using
/// [`Tolerances::for_golden`].
///
/// # Errors
/// Only when the backend itself fails; divergences are in the [`Report`] (see
/// [`Report::into_result`]).
pub fn check_model<M: ParityModel + ?Sized>(fixture: &Fixture, model: &mut M) -> Result<Report, ParityError> {
    check_model_with(fixture, model, &Tolerances::for_golden(&fixture.golden))
}

/// [`check_model`] with explicit tolerances.
///
/// # Errors
/// As [`check_model`].
pub fn check_model_with<M: ParityModel + ?Sized>(
    fixture: &Fixture,
    model: &mut M,
    tol: &Tolerances,
) -> Result<Report, ParityError> {
    let mut report = Report::new(&fixture.name);
    for seq in &fixture.golden.sequences {
        let rows = model.logits(&seq.tokens).map_err(backend(&fixture.name, &seq.name))?;
        report.record(compare_logits(&fixture.name, seq, &rows, tol));
    }
    for run in &fixture.golden.greedy {
        let got = model.greedy(&run.prompt, run.max_tokens).map_err(backend(&fixture.name, &run.name))?;
        report.checked += 1;
        match compare_greedy(&fixture.name, run, &got, tol) {
            Ok(GreedyOutcome::Identical) => {}
            Ok(GreedyOutcome::NearTie { step, margin }) => report.notes.push(format!(
                "greedy `{}`: took the other side of a near tie at step {step} (mlx-lm's margin {margin:.4}); not compared after it",
                run.name
            )),
            Err(d) => report.divergences.push(*d),
        }
    }
    Ok(report)
}

/// Encodes and decodes the tokenizer corpus and compares with the `tokenizers` library's results.
///
/// # Errors
/// Only when the tokenizer itself fails; divergences are in the [`Report`].
pub fn check_tokenizer<T: ParityTokenizer + ?Sized>(golden: &TokenizerGolden, tok: &T) -> Result<Report, ParityError> {
    let name = format!("tokenizer-{}", golden.tokenizer);
    let mut report = Report::new(&name);
    for case in &golden.cases {
        let label = format!("{:?}", case.text);
        let fail = backend(&name, &label);
        let plain = tok.encode(&case.text, false).map_err(fail)?;
        report.record(compare_ids(&name, "encode", &label, &case.ids, &plain));
        let special = tok.encode(&case.text, true).map_err(backend(&name, &label))?;
        report.record(compare_ids(&name, "encode with special tokens", &label, &case.ids_with_special, &special));
        if let Some(tokens) = tok.tokens(&case.text).map_err(backend(&name, &label))? {
            report.record(compare_text(&name, "token strings", &label, &case.tokens.join(" | "), &tokens.join(" | ")));
        }
        let decoded = tok.decode(&case.ids_with_special, false).map_err(backend(&name, &label))?;
        report.record(compare_text(&name, "decode", &label, &case.decoded, &decoded));
        let skipped = tok.decode(&case.ids_with_special, true).map_err(backend(&name, &label))?;
        report.record(compare_text(
            &name,
            "decode skipping special tokens",
            &label,
            &case.decoded_skip_special,
            &skipped,
        ));
    }
    Ok(report)
}

/// Renders a fixture's chat conversations and encodes them without special tokens, comparing the
/// text and the ids with mlx-lm's tokenizer.
///
/// # Errors
/// Only when the renderer or tokenizer itself fails; divergences are in the [`Report`].
pub fn check_chat<R: ChatRenderer + ?Sized, T: ParityTokenizer + ?Sized>(
    fixture: &Fixture,
    render: &R,
    tok: &T,
) -> Result<Report, ParityError> {
    let mut report = Report::new(&fixture.name);
    for case in &fixture.golden.chat {
        let text =
            render.render(&case.messages, case.add_generation_prompt).map_err(backend(&fixture.name, &case.name))?;
        report.record(compare_text(&fixture.name, "chat template", &case.name, &case.text, &text));
        let ids = tok.encode(&case.text, false).map_err(backend(&fixture.name, &case.name))?;
        report.record(compare_ids(&fixture.name, "chat ids", &case.name, &case.ids, &ids));
    }
    Ok(report)
}
