// SPDX-License-Identifier: EUPL-1.2
//! Tokens to the text a caller sees: EOS and stop tokens end a generation,
//! text is decoded as it becomes complete, stop strings cut it, and the
//! requested scores ride along.

use std::ops::ControlFlow;

use inference_core::{GenerateSettings, LogitsMode, Token, TopLogprob, TopLogprobs};
use mlx::{Array, Error, ops};

use crate::generate::Step;
use crate::tokenizer::{StopMatcher, StreamDecoder, Tokenizer};

/// Attaches the requested log-probabilities, logits and most likely
/// alternatives to a token. The log-probabilities are those the row was
/// sampled from (after any repetition penalty, before temperature), as
/// mlx-lm's are.
pub(super) fn with_scores(
    mut token: Token,
    step: &Step<'_>,
    settings: &GenerateSettings,
    tokenizer: &Tokenizer,
) -> Result<Token, Error> {
    let mode = settings.logits;
    if mode == LogitsMode::None && settings.top_logprobs.is_none() {
        return Ok(token);
    }
    let idx = Array::scalar(step.id as i32);
    token.logprob = Some(ops::take(step.logprobs, &idx, 0)?.to_vec_f32()?[0]);
    if mode != LogitsMode::None {
        token.logits = Some(match mode {
            LogitsMode::Logits => step.logits.to_vec_f32()?,
            _ => step.logprobs.to_vec_f32()?,
        });
    }
    if let Some(k) = settings.top_logprobs {
        token.top_logprobs = Some(top_logprobs(step, k, tokenizer)?);
    }
    Ok(token)
}

/// The token's own text and the `k` most likely tokens at its step.
fn top_logprobs(step: &Step<'_>, k: usize, tokenizer: &Tokenizer) -> Result<TopLogprobs, Error> {
    let vocab = step.logprobs.dim(-1)? as usize;
    let k = k.min(vocab);
    let mut top = Vec::with_capacity(k);
    if k > 0 {
        // The k largest, unordered, then ordered here (k is small).
        let negated = ops::negative(step.logprobs)?;
        let ids = ops::slice_axis(&ops::argpartition(&negated, (k - 1) as i32, -1)?, -1, 0, k as i32)?;
        let values = ops::take(step.logprobs, &ids, -1)?.to_vec_f32()?;
        for (id, logprob) in crate::generate::read_ids("top_logprobs", &ids)?.into_iter().zip(values) {
            top.push(TopLogprob { id, text: tokenizer.decode(&[id], false)?, logprob });
        }
        top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob).then(a.id.cmp(&b.id)));
    }
    Ok(TopLogprobs { text: tokenizer.decode(&[step.id], false)?, top })
}

/// Turns a model's tokens into the tokens a caller sees: stops at EOS and
/// stop tokens, decodes text as it becomes complete, cuts at stop strings
/// and attaches the requested scores.
pub(super) struct TextOut {
    settings: GenerateSettings,
    tokenizer: Tokenizer,
    decoder: StreamDecoder,
    stops: StopMatcher,
    held: Option<Token>,
}

impl TextOut {
    pub(super) fn new(tokenizer: &Tokenizer, settings: &GenerateSettings) -> Self {
        TextOut {
            settings: settings.clone(),
            tokenizer: tokenizer.clone(),
            decoder: tokenizer.stream_decoder(true),
            stops: StopMatcher::new(settings.stop_strings.iter().cloned()),
            held: None,
        }
    }

    /// Handles one step; `send` delivers a token and says whether the
    /// consumer is still there.
    pub(super) fn push(
        &mut self,
        step: &Step<'_>,
        send: &mut impl FnMut(Token) -> bool,
    ) -> Result<ControlFlow<()>, Error> {
        let id = step.id;
        if self.settings.stop_tokens.contains(&id) || (!self.settings.ignore_eos && self.tokenizer.is_eos(id)) {
            return Ok(ControlFlow::Break(()));
        }
        let piece = self.decoder.push(id)?;
        let chunk = self.stops.push(&piece);
        let token = with_scores(Token::new(id, chunk.text), step, &self.settings, &self.tokenizer)?;
        // A token whose text may still grow (held stop-string prefix or an
        // unfinished character) waits until the next token or the end.
        if let Some(prev) = self.held.take()
            && !send(prev)
        {
            return Ok(ControlFlow::Break(()));
        }
        if chunk.stopped {
            self.held = Some(token);
            return Ok(ControlFlow::Break(()));
        }
        if !self.settings.stop_strings.is_empty() || self.stops.has_pending() || self.decoder.has_pending() {
            self.held = Some(token);
        } else if !send(token) {
            return Ok(ControlFlow::Break(()));
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Which of the settings' stop strings ended the text (its index), if one did.
    pub(crate) fn stop_string(&self) -> Option<usize> {
        let matched = self.stops.matched()?;
        self.settings.stop_strings.iter().position(|s| s == matched)
    }

    /// Classification: the token as the model drew it (EOS, stop tokens and
    /// stop strings do not apply), with its text and the requested scores;
    /// always the last.
    pub(super) fn push_raw(
        &mut self,
        step: &Step<'_>,
        send: &mut impl FnMut(Token) -> bool,
    ) -> Result<ControlFlow<()>, Error> {
        let text = self.tokenizer.decode(&[step.id], true)?;
        send(with_scores(Token::new(step.id, text), step, &self.settings, &self.tokenizer)?);
        Ok(ControlFlow::Break(()))
    }

    /// Delivers the held token with the rest of the text.
    pub(super) fn finish(mut self, send: &mut impl FnMut(Token) -> bool) -> Result<(), Error> {
        if let Some(mut last) = self.held.take() {
            if !self.stops.is_stopped() {
                let tail = self.decoder.finish()?;
                let chunk = self.stops.push(&tail);
                last.text.push_str(&chunk.text);
                if !chunk.stopped {
                    last.text.push_str(&self.stops.finish());
                }
            }
            send(last);
        }
        Ok(())
    }
}
