// SPDX-License-Identifier: EUPL-1.2
//! Speculative decoding: guess a few tokens cheaply, then let the model
//! check them all in one forward pass.
//!
//! Two ways to guess ("draft"):
//!
//! - **Prompt lookup** ([`lookup_draft`]): the continuation of the most recent
//!   earlier occurrence of the text's last n-gram (longest n first). Needs no
//!   second model; pays off where the answer repeats its input (code edits,
//!   summaries, retrieval answers).
//! - **A draft model** ([`draft_greedy`]): a smaller model with the same
//!   tokenizer proposes its greedy continuation. Its caches are kept in step
//!   with the text: each call keeps the longest prefix they share with it,
//!   trims the rest (the rejected guesses) and feeds what is missing.
//!
//! Checking ([`accepted`]): the model runs on the last token and the `k`
//! guesses together, every position is sampled with the request's own
//! sampler, and guesses are accepted while each equals the model's own
//! sample at its position; the sample after the last accepted guess comes
//! for free. Both drafters propose one token per position deterministically,
//! and for a deterministic guess this rule is the standard rejection rule
//! (accept guess `d` with probability `p(d)`; on rejection draw from `p`
//! without `d`, renormalised), which is what mlx-lm's `speculative_generate_step`
//! runs too: every token handed out is a sample of the model's distribution
//! given the tokens before it, and greedy output equals plain decoding token
//! for token.

use std::path::PathBuf;

use crate::cache::LayerCache;
use crate::generate;
use crate::model::LanguageModel;
use mlx::{Array, Error, Result, ops};

/// The longest n-gram prompt lookup tries unless told otherwise.
pub const DEFAULT_LOOKUP_NGRAM: usize = 3;

/// Guesses per step with a draft model unless told otherwise (mlx-lm's default).
pub const DEFAULT_DRAFT_TOKENS: usize = 3;

/// Guesses per step with prompt lookup unless told otherwise.
pub const DEFAULT_LOOKUP_TOKENS: usize = 8;

/// Where the guesses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DraftSource {
    /// Prompt lookup: n-grams of at most this many tokens.
    PromptLookup {
        /// The longest n-gram matched (at least 1).
        max_ngram: usize,
    },
    /// A draft model's directory.
    Model(PathBuf),
}

/// Speculative decoding's settings (the backend options `prompt_lookup`,
/// `draft_model`, `num_draft_tokens`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeculativeConfig {
    /// Where the guesses come from.
    pub source: DraftSource,
    /// The most guesses checked per forward pass (at least 1).
    pub num_draft_tokens: usize,
}

impl SpeculativeConfig {
    /// The settings the backend options ask for: `draft_model = DIR` or
    /// `prompt_lookup = N` (the longest n-gram, at least 1; `true` for
    /// [`DEFAULT_LOOKUP_NGRAM`]), and `num_draft_tokens` (at least 1); `None`
    /// when neither source is named.
    ///
    /// # Errors
    ///
    /// Both sources named, `num_draft_tokens` without a source, or a value out
    /// of range, named with its value.
    pub fn from_backend_options(options: &std::collections::BTreeMap<String, String>) -> Result<Option<Self>> {
        let bad = |key: &str, v: &str, why: &str| Error::invalid("load_settings", format!("{key} = {v:?} {why}"));
        let lookup = match options.get("prompt_lookup").map(|v| (v, v.trim())) {
            None => None,
            Some((_, "true")) => Some(DEFAULT_LOOKUP_NGRAM),
            Some((_, "false")) => None,
            Some((v, t)) => match t.parse::<usize>() {
                Ok(n) if (1..=64).contains(&n) => Some(n),
                _ => return Err(bad("prompt_lookup", v, "must be true, false or an n-gram length from 1 to 64")),
            },
        };
        let draft = match options.get("draft_model") {
            None => None,
            Some(d) if d.trim().is_empty() => return Err(bad("draft_model", d, "must name a model directory")),
            Some(d) => Some(PathBuf::from(d)),
        };
        let count = match options.get("num_draft_tokens") {
            None => None,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=64).contains(&n) => Some(n),
                _ => return Err(bad("num_draft_tokens", v, "must be a whole number from 1 to 64")),
            },
        };
        let (source, default) = match (lookup, draft) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "load_settings",
                    "prompt_lookup and draft_model are two ways to draft: choose one",
                ));
            }
            (Some(max_ngram), None) => (DraftSource::PromptLookup { max_ngram }, DEFAULT_LOOKUP_TOKENS),
            (None, Some(dir)) => (DraftSource::Model(dir), DEFAULT_DRAFT_TOKENS),
            (None, None) if count.is_some() => {
                return Err(Error::invalid(
                    "load_settings",
                    "num_draft_tokens needs a way to draft: draft_model or prompt_lookup",
                ));
            }
            (None, None) => return Ok(None),
        };
        Ok(Some(SpeculativeConfig { source, num_draft_tokens: count.unwrap_or(default) }))
    }
}

/// Prompt lookup: up to `k` tokens that followed the most recent earlier
/// occurrence of the last `n` tokens of `context`, for the longest `n` from
/// `max_ngram` down to 1 that has one; empty when none does.
pub fn lookup_draft(context: &[u32], max_ngram: usize, k: usize) -> Vec<u32> {
    let len = context.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (1..=max_ngram.min(len.saturating_sub(1))).rev() {
        let pattern = &context[len - n..];
        // The most recent match first: the text nearest the end is the likeliest to go on alike.
        for start in (0..len - n).rev() {
            if &context[start..start + n] == pattern {
                let from = start + n;
                return context[from..(from + k).min(len)].to_vec();
            }
        }
    }
    Vec::new()
}

/// How many of `drafts` were accepted: the length of the prefix in which
/// each guess equals the model's own sample at its position (`sampled`, one
/// more entry than `drafts`: its last is the sample after the last guess).
pub fn accepted(drafts: &[u32], sampled: &[u32]) -> usize {
    drafts.iter().zip(sampled).take_while(|(d, s)| d == s).count()
}

/// The tokens a draft model's caches hold, in order (what [`draft_greedy`]
/// keeps in step with the text).
#[derive(Debug, Default, Clone)]
pub struct DraftState {
    /// What the caches hold, as far as it has been read back.
    pub held: Vec<u32>,
    /// The last call's fed token and its guesses, not yet read back: the
    /// caches hold the token and every guess but the last.
    queued: Option<(u32, Array)>,
}

impl DraftState {
    /// Reads back the last call's guesses (already computed when the model
    /// has checked them) into [`DraftState::held`].
    fn settle(&mut self) -> Result<()> {
        if let Some((last, guesses)) = self.queued.take() {
            let ids = crate::generate::read_ids("draft", &guesses)?;
            self.held.push(last);
            self.held.extend_from_slice(&ids[..ids.len().saturating_sub(1)]);
        }
        Ok(())
    }
}

/// A draft model's greedy guesses of the `k` tokens after `context`
/// (non-empty), `[k]` token ids left queued on the device: the model's check
/// can take them as input and one host sync reads both (as mlx-lm's
/// `speculative_generate_step` does). Its `caches` (any kind that can trim)
/// are brought in step with `context` first: the tokens after the longest
/// prefix they share with it are trimmed away (rejected guesses) and the
/// missing ones fed, with the last token in one forward pass when they fit
/// in `prefill_step`, else in chunks of it first. Each forward pass is
/// started on the device as soon as it is queued, so building the next one
/// overlaps it.
///
/// # Errors
///
/// An empty `context`, caches that cannot trim what they must, or a failed
/// forward pass.
pub fn draft_greedy(
    draft: &dyn LanguageModel,
    caches: &mut [LayerCache],
    state: &mut DraftState,
    context: &[u32],
    k: usize,
    prefill_step: usize,
) -> Result<Array> {
    const OP: &str = "draft";
    let Some((&last, _)) = context.split_last() else {
        return Err(Error::invalid(OP, "the text to continue is empty"));
    };
    if k == 0 {
        return Err(Error::invalid(OP, "no guesses asked for"));
    }
    state.settle()?;
    // The last token is always fed again: its logits give the first guess.
    let common = state.held.iter().zip(context).take_while(|(a, b)| a == b).count().min(context.len() - 1);
    let excess = state.held.len() - common;
    if excess > 0 {
        for c in caches.iter_mut() {
            let trimmed = c.trim(excess as i32);
            if trimmed != excess as i32 {
                return Err(Error::invalid(OP, format!("the draft's cache trimmed {trimmed} of {excess} positions")));
            }
        }
        state.held.truncate(common);
    }
    for c in caches.iter_mut() {
        if let LayerCache::Batch(b) = c {
            b.compact()?;
        }
    }
    let step = prefill_step.max(1);
    let mut missing = &context[common..];
    while missing.len() > step {
        let x = ops::reshape(&generate::tokens_array(&missing[..step])?, &[1, -1])?;
        generate::prefill_chunk(draft, &x, caches)?;
        state.held.extend_from_slice(&missing[..step]);
        missing = &missing[step..];
    }
    let fed = missing.len() - 1;
    let mut x = ops::reshape(&generate::tokens_array(missing)?, &[1, -1])?;
    let mut guesses: Vec<Array> = Vec::with_capacity(k);
    for i in 0..k {
        let logits = generate::last_position(&draft.forward(&x, caches)?)?;
        let y = ops::argmax(&logits, -1, false)?;
        mlx::transforms::async_eval(&[&y])?;
        if i + 1 < k {
            x = ops::reshape(&y, &[1, 1])?;
        }
        guesses.push(y);
    }
    state.held.extend_from_slice(&missing[..fed]);
    let all = ops::concatenate(&guesses.iter().collect::<Vec<_>>(), 0)?;
    state.queued = Some((last, all.clone()));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_takes_the_longest_most_recent_match() {
        // "1 2 3 4 5 ... 1 2 3" → the trigram "1 2 3" continues with "4 5".
        let ctx = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3];
        assert_eq!(lookup_draft(&ctx, 3, 2), vec![4, 5]);
        assert_eq!(lookup_draft(&ctx, 3, 10), vec![4, 5, 9, 9, 1, 2, 3]);
        // Two matches of "7 8": the later one wins.
        let ctx = [7, 8, 1, 7, 8, 2, 7, 8];
        assert_eq!(lookup_draft(&ctx, 2, 1), vec![2]);
        // The bigram has no match, the unigram does.
        let ctx = [5, 6, 3, 4, 6];
        assert_eq!(lookup_draft(&ctx, 3, 2), vec![3, 4]);
        // Nothing repeats, or nothing to look in.
        assert!(lookup_draft(&[1, 2, 3], 3, 4).is_empty());
        assert!(lookup_draft(&[1], 3, 4).is_empty());
        assert!(lookup_draft(&[], 3, 4).is_empty());
        assert!(lookup_draft(&[1, 1], 3, 0).is_empty());
        assert_eq!(lookup_draft(&[1, 1], 3, 4), vec![1]);
    }

    #[test]
    fn accepted_counts_the_matching_prefix() {
        assert_eq!(accepted(&[4, 5, 6], &[4, 5, 6, 7]), 3);
        assert_eq!(accepted(&[4, 5, 6], &[4, 9, 6, 7]), 1);
        assert_eq!(accepted(&[4, 5, 6], &[1, 5, 6, 7]), 0);
        assert_eq!(accepted(&[], &[1]), 0);
    }

    #[test]
    fn options_choose_a_source_or_say_what_is_wrong() {
        let opts = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(SpeculativeConfig::from_backend_options(&opts(&[])).unwrap(), None);
        let c = SpeculativeConfig::from_backend_options(&opts(&[("prompt_lookup", "true")])).unwrap().unwrap();
        assert_eq!(c.source, DraftSource::PromptLookup { max_ngram: DEFAULT_LOOKUP_NGRAM });
        assert_eq!(c.num_draft_tokens, DEFAULT_LOOKUP_TOKENS);
        let c = SpeculativeConfig::from_backend_options(&opts(&[("draft_model", "/m"), ("num_draft_tokens", "5")]))
            .unwrap()
            .unwrap();
        assert_eq!((c.source, c.num_draft_tokens), (DraftSource::Model("/m".into()), 5));
        for (pairs, needle) in [
            (&[("prompt_lookup", "2"), ("draft_model", "/m")][..], "choose one"),
            (&[("num_draft_tokens", "4")][..], "needs a way to draft"),
            (&[("prompt_lookup", "0")][..], "prompt_lookup = \"0\""),
            (&[("prompt_lookup", "yes")][..], "prompt_lookup = \"yes\""),
            (&[("draft_model", " ")][..], "draft_model"),
            (&[("prompt_lookup", "true"), ("num_draft_tokens", "0")][..], "num_draft_tokens = \"0\""),
        ] {
            let e = SpeculativeConfig::from_backend_options(&opts(pairs)).unwrap_err().to_string();
            assert!(e.contains(needle), "{pairs:?}: {e}");
        }
    }
}
