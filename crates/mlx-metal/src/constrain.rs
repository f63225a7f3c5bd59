// SPDX-License-Identifier: EUPL-1.2
//! Constrained decoding: inference-core's [`Constraint`] compiled by
//! `llguidance` into a per-row token mask.
//!
//! [`Grammars`] is a model's compiler: the token trie of its vocabulary (the
//! bytes of every token, read from `tokenizer.json` by llguidance's own reader;
//! forced strings are tokenised by our tokenizer), built once, on the first
//! constrained request. [`RowConstraint`] is one generation's matcher: before
//! each draw [`mask`](RowConstraint::mask) gives an additive `[1, V]` mask
//! (0 where a token may continue the match, -inf elsewhere; only the end tokens
//! once the match is complete), and after it [`commit`](RowConstraint::commit)
//! advances the matcher by the token drawn. A matcher that fails (a token it
//! did not allow, a grammar too large for its limits) does not fail the batch:
//! it allows only the end tokens from then on and keeps the error for its row
//! ([`RowConstraint::error`]).
//!
//! `toktrie_hf_tokenizers` is not used: it pins `tokenizers` 0.21 (a second
//! copy beside our 0.23); its byte mapping is the same code as llguidance's
//! `token_bytes_from_tokenizer_json`, which this uses.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use inference_core::Constraint;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use mlx::{Array, Dtype, Error, Result, ops};

use crate::tokenizer::Tokenizer;

/// A model's constraint compiler, built on first use.
pub struct Grammars {
    tokenizer: Tokenizer,
    factory: OnceLock<std::result::Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("built", &self.factory.get().is_some()).finish()
    }
}

/// Our tokenizer under llguidance: the trie from `tokenizer.json`, strings
/// tokenised as the model's tokenizer does.
struct Env {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode(text, false).unwrap_or_default())
    }
}

impl Grammars {
    /// The compiler for `tokenizer`'s vocabulary (nothing is built yet).
    pub fn new(tokenizer: Tokenizer) -> Self {
        Self { tokenizer, factory: OnceLock::new() }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>> {
        self.factory
            .get_or_init(|| {
                let started = Instant::now();
                let built = build_factory(&self.tokenizer).map_err(|e| format!("{e:#}"));
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    ok = built.is_ok(),
                    "token trie built"
                );
                built.map(Arc::new)
            })
            .as_ref()
            .map_err(|e| Error::invalid("constraint", format!("the tokenizer's vocabulary could not be read: {e}")))
    }

    /// Compiles `c` for one generation.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`]-like errors naming the constraint's kind and
    /// llguidance's message (an invalid schema, pattern or grammar).
    pub fn compile(&self, c: &Constraint) -> Result<RowConstraint> {
        let factory = self.factory()?;
        let grammar = match c {
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"}))),
            Constraint::JsonSchema(s) => TopLevelGrammar::from_json_schema(compact(s.clone())),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let matcher = Matcher::new(factory.create_parser(grammar));
        if let Some(e) = matcher.get_error() {
            return Err(Error::invalid("constraint", format!("the {} constraint does not compile: {e}", c.kind())));
        }
        let eos = factory.tok_env().tok_trie().eos_token_set();
        Ok(RowConstraint { matcher, eos, error: None, mask_time: Duration::ZERO, steps: 0 })
    }
}

/// `schema` with llguidance's layout options, unless it sets its own
/// (`x-guidance`): JSON laid out as Python's `json.dumps` lays it out (`", "`
/// and `": "`, no other white space), so that a model cannot fill its tokens
/// with white space between values.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut()
        && !o.contains_key("x-guidance")
    {
        o.insert("x-guidance".into(), layout());
    }
    schema
}

/// The layout [`compact`] asks for.
pub(crate) fn layout() -> serde_json::Value {
    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl Grammars {
    /// Compiles `settings`' constraint once, so that one that does not
    /// compile is refused before a generation starts, naming what is wrong
    /// (the scheduler compiles each row's own).
    ///
    /// # Errors
    /// [`inference_core::Error::InvalidSetting`] naming `constraint`.
    pub fn check(&self, settings: &inference_core::GenerateSettings) -> inference_core::Result<()> {
        match &settings.constraint {
            Some(c) => self
                .compile(c)
                .map(drop)
                .map_err(|e| inference_core::Error::invalid_setting("constraint", c.kind(), e.to_string())),
            None => Ok(()),
        }
    }
}

fn build_factory(tokenizer: &Tokenizer) -> anyhow::Result<ParserFactory> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(tokenizer.path())?)?;
    let words = llguidance::token_bytes_from_tokenizer_json(&json)?;
    let eos = tokenizer.eos_ids();
    let first_eos = *eos.first().ok_or_else(|| anyhow::anyhow!("the tokenizer names no end-of-sequence token"))?;
    let info = TokRxInfo { tok_bos: tokenizer.bos_id(), ..TokRxInfo::new(words.len() as u32, first_eos) };
    let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
    let env: TokEnv = Arc::new(Env { trie, tokenizer: tokenizer.clone() });
    let mut factory = ParserFactory::new_simple(&env)?;
    factory.quiet();
    Ok(factory)
}

/// One generation's matcher (see the module documentation).
pub struct RowConstraint {
    matcher: Matcher,
    eos: toktrie::SimpleVob,
    error: Option<String>,
    mask_time: Duration,
    steps: u32,
}

impl std::fmt::Debug for RowConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowConstraint").field("error", &self.error).field("steps", &self.steps).finish()
    }
}

impl RowConstraint {
    /// The additive mask for the next draw over `vocab` logits, in `dtype`:
    /// `[1, vocab]`, 0 where allowed and -inf elsewhere.
    pub fn mask(&mut self, vocab: usize, dtype: Dtype) -> Result<Array> {
        let started = Instant::now();
        let allowed = if self.error.is_some() {
            self.eos.clone()
        } else {
            match self.matcher.compute_mask_or_eos() {
                Ok(m) if m.is_zero() => self.fail("no token can continue the match".into()),
                Ok(m) => m,
                Err(e) => self.fail(format!("{e:#}")),
            }
        };
        let mut values = vec![f32::NEG_INFINITY; vocab];
        allowed.iter_set_entries(|i| {
            if let Some(v) = values.get_mut(i) {
                *v = 0.0;
            }
        });
        let mask = ops::astype(&Array::from_slice(&values, &[1, vocab as i32])?, dtype)?;
        self.mask_time += started.elapsed();
        self.steps += 1;
        Ok(mask)
    }

    /// Advances the matcher by the token drawn.
    pub fn commit(&mut self, id: u32) {
        if self.error.is_none()
            && !self.matcher.is_stopped()
            && let Err(e) = self.matcher.consume_token(id)
        {
            self.fail(format!("{e:#}"));
        }
    }

    /// Why the matcher failed, if it did; the row ends with this error.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether the match is complete (only an end token may follow).
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The time spent computing masks, and how many.
    pub fn mask_cost(&self) -> (Duration, u32) {
        (self.mask_time, self.steps)
    }

    fn fail(&mut self, why: String) -> toktrie::SimpleVob {
        tracing::warn!(error = %why, "a constrained generation's matcher failed");
        self.error = Some(why);
        self.eos.clone()
    }
}
