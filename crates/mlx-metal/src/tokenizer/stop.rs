// SPDX-License-Identifier: EUPL-1.2
//! Stop strings that may span token boundaries.

/// What [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopChunk {
    /// Text that is safe to emit now: it holds no part of a stop string.
    pub text: String,
    /// Whether a stop string was reached; `text` ends where it began, and generation should stop.
    pub stopped: bool,
}

/// Finds stop strings in streamed text, so that no part of a stop string is ever emitted.
///
/// Text that could be the start of a stop string is held back until the following text shows
/// whether it is one; [`finish`](Self::finish) releases what is held when the stream ends
/// without a stop.
///
/// ```
/// use mlx_metal::tokenizer::StopMatcher;
/// let mut stop = StopMatcher::new(["</answer>"]);
/// assert_eq!(stop.push("42 </ans").text, "42 ");
/// let last = stop.push("wer> trailing");
/// assert!(last.stopped);
/// assert_eq!(last.text, "");
/// ```
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    matched: Option<usize>,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut list: Vec<String> = Vec::new();
        for s in stops.into_iter().map(Into::into) {
            if !s.is_empty() && !list.contains(&s) {
                list.push(s);
            }
        }
        Self { stops: list, held: String::new(), matched: None }
    }

    /// The stop strings.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Adds streamed text. Returns the text that is safe to emit and whether a stop string was
    /// reached; after a stop, every further push returns nothing.
    pub fn push(&mut self, text: &str) -> StopChunk {
        if self.matched.is_some() {
            return StopChunk { text: String::new(), stopped: true };
        }
        self.held.push_str(text);

        // The earliest stop string wins; at one position, the longest.
        let mut hit: Option<(usize, usize)> = None;
        for (i, stop) in self.stops.iter().enumerate() {
            if let Some(pos) = self.held.find(stop.as_str()) {
                let better = match hit {
                    None => true,
                    Some((p, j)) => pos < p || pos == p && stop.len() > self.stops[j].len(),
                };
                if better {
                    hit = Some((pos, i));
                }
            }
        }
        if let Some((pos, i)) = hit {
            self.matched = Some(i);
            self.held.truncate(pos);
            return StopChunk { text: std::mem::take(&mut self.held), stopped: true };
        }

        // Hold back the longest suffix that begins some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stops.iter().any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .unwrap_or(self.held.len());
        let held = self.held.split_off(keep_from);
        StopChunk { text: std::mem::replace(&mut self.held, held), stopped: false }
    }

    /// Releases the text held back at the end of a stream that did not stop (nothing after a
    /// stop), and starts afresh.
    pub fn finish(&mut self) -> String {
        let held = if self.matched.is_some() { String::new() } else { std::mem::take(&mut self.held) };
        self.reset();
        held
    }

    /// Forgets held text and any stop reached.
    pub fn reset(&mut self) {
        self.held.clear();
        self.matched = None;
    }

    /// Whether a stop string has been reached.
    pub fn is_stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// The stop string that was reached, if any.
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Whether text is being held back.
    pub fn has_pending(&self) -> bool {
        !self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_stops_everything_passes() {
        let mut m = StopMatcher::new(Vec::<String>::new());
        assert_eq!(m.push("abc"), StopChunk { text: "abc".into(), stopped: false });
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn overlapping_stops_pick_the_earliest() {
        let mut m = StopMatcher::new(["bc", "abcd"]);
        let c = m.push("xabc");
        assert!(c.stopped);
        assert_eq!(c.text, "xa");
        assert_eq!(m.matched(), Some("bc"));
    }

    #[test]
    fn held_text_keeps_multibyte_characters_whole() {
        let mut m = StopMatcher::new(["éé!"]);
        assert_eq!(m.push("aé").text, "a");
        assert_eq!(m.push("é").text, "");
        assert_eq!(m.push("x").text, "ééx");
    }
}
