// SPDX-License-Identifier: EUPL-1.2
//! Streaming detokenisation: text for each new id, whole characters only.

use super::Tokenizer;
use mlx::Result;

const REPLACEMENT: char = '\u{FFFD}';

/// Past this many ids waiting behind an unfinished character, the text is emitted anyway (the
/// bytes cannot become valid UTF-8; four bytes is the longest character).
const MAX_PENDING: usize = 64;

/// Turns a stream of token ids into text, one piece per id, so that the concatenation of the
/// pieces is exactly [`Tokenizer::decode`] of all the ids.
///
/// Each [`push`](Self::push) decodes a short window of ids (those since the start of the last
/// emitted piece) and returns what the window added to the text it already produced. While the
/// window's text ends in an unfinished UTF-8 character (U+FFFD from a byte-level token or a
/// byte-fallback token such as `<0xE2>`), nothing is returned; the character comes out whole
/// once its last byte arrives. Because the window always starts at a token that was decoded
/// before, the decoder's context rules (the SentencePiece `▁` → space, the leading space that
/// `Metaspace` or `Strip` removes only at the very start) come out as in a full decode.
///
/// Genuinely invalid bytes come out as U+FFFD, as in [`Tokenizer::decode`]; they are emitted once
/// a later token shows they cannot complete, or at [`finish`](Self::finish). One case cannot match
/// a full decode: a byte-fallback run that mixes a valid character with invalid bytes, which the
/// `ByteFallback` decoder replaces as a whole (every byte becomes U+FFFD, the valid character
/// included). The stream has already emitted that valid character; it then emits one U+FFFD per
/// invalid byte.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// The window: ids since the start of the last emitted piece.
    ids: Vec<u32>,
    /// How many ids at the front of the window have been emitted.
    done: usize,
    /// The decoded text of `ids[..done]`.
    prefix: String,
}

impl StreamDecoder {
    /// A decoder over `tokenizer`; `skip_special_tokens` as in [`Tokenizer::decode`].
    pub fn new(tokenizer: &Tokenizer, skip_special_tokens: bool) -> Self {
        Self { tokenizer: tokenizer.clone(), skip_special_tokens, ids: Vec::new(), done: 0, prefix: String::new() }
    }

    /// Adds one id and returns the text it completes: empty while a character is unfinished
    /// (or the id decodes to nothing, such as a skipped special token).
    ///
    /// # Errors
    /// As [`Tokenizer::decode`]. The decoder is left as it was before the call.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = match self.decode(&self.ids) {
            Ok(text) => text,
            Err(e) => {
                self.ids.pop();
                return Err(e);
            }
        };
        let unfinished = text.ends_with(REPLACEMENT) && self.ids.len() - self.done < MAX_PENDING;
        if unfinished || text.len() <= self.prefix.len() && text.starts_with(&self.prefix) {
            return Ok(String::new());
        }
        let piece = self.new_text(text)?;
        self.advance()?;
        Ok(piece)
    }

    /// Returns whatever is still held back (an unfinished character becomes U+FFFD, as in
    /// [`Tokenizer::decode`]) and starts afresh.
    ///
    /// # Errors
    /// As [`Tokenizer::decode`].
    pub fn finish(&mut self) -> Result<String> {
        let piece = if self.ids.len() > self.done {
            let text = self.decode(&self.ids)?;
            self.new_text(text)?
        } else {
            String::new()
        };
        self.reset();
        Ok(piece)
    }

    /// Forgets every id: the next [`push`](Self::push) starts a new text.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.done = 0;
        self.prefix.clear();
    }

    /// Whether ids are held back waiting for the rest of a character.
    pub fn has_pending(&self) -> bool {
        self.ids.len() > self.done
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, self.skip_special_tokens)
    }

    /// The part of the window's `text` not emitted yet.
    fn new_text(&self, text: String) -> Result<String> {
        if let Some(rest) = text.strip_prefix(self.prefix.as_str()) {
            return Ok(rest.to_string());
        }
        // The window's text changed under the emitted part (a byte-fallback run that turned
        // invalid as a whole): decode the new ids on their own, after the last emitted token when
        // that token cannot join their byte run, so that its context still applies.
        let tail = &self.ids[self.done..];
        if let Some(&anchor) = self.ids[..self.done].last()
            && !self.tokenizer.is_byte_token(anchor)
        {
            let before = self.decode(&[anchor])?;
            let mut with_anchor = Vec::with_capacity(tail.len() + 1);
            with_anchor.push(anchor);
            with_anchor.extend_from_slice(tail);
            if let Some(rest) = self.decode(&with_anchor)?.strip_prefix(before.as_str()) {
                return Ok(rest.to_string());
            }
        }
        self.decode(tail)
    }

    /// After emitting: the window becomes the ids of the piece just emitted.
    fn advance(&mut self) -> Result<()> {
        self.ids.drain(..self.done);
        self.done = self.ids.len();
        self.prefix = self.decode(&self.ids)?;
        Ok(())
    }
}
