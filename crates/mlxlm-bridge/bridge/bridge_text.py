# SPDX-License-Identifier: EUPL-1.2
"""Token texts: sampled token ids assembled into token events whose texts concatenate to the
output, held back while the detokeniser or a possible stop string needs them. Needs only Python
(tests/fixtures/assembler_check.py checks it with a fake tokenizer)."""


def _pending(detokenizer):
    """Whether the streaming detokeniser still holds text back (to be released by finalize)."""
    unflushed = getattr(detokenizer, "_unflushed", None)
    if unflushed is not None:
        return bool(unflushed)
    current = getattr(detokenizer, "_current_tokens", None)
    inner = getattr(detokenizer, "_tokenizer", None)
    if current is not None and inner is not None:
        return bool(current) and inner.decode(current) != getattr(detokenizer, "_current_text", "")
    return True


class Assembler:
    """Turns sampled token ids into token events whose texts concatenate to the output.

    A token is held back while mlx-lm's streaming detokeniser holds part of its text, or while the
    text could be the start of a stop string, so that each token event is sent once with its final
    text. When a stop string appears, the output is cut just before it: the token in which it
    starts is sent with its text cut there, and the tokens after it are dropped.
    """

    def __init__(self, tokenizer, stop_strings):
        self.detokenizer = tokenizer.detokenizer
        self.stop_strings = stop_strings
        self.held = []
        self.stopped = False

    def add(self, token_id, logprob=None, logits=None):
        self.detokenizer.add_token(token_id)
        self.held.append([token_id, self.detokenizer.last_segment, logprob, logits])
        return self._release(final=False)

    def finish(self):
        self.detokenizer.finalize()
        tail = self.detokenizer.last_segment
        if tail:
            if self.held:
                self.held[-1][1] += tail
            else:
                # Only reached by a detokeniser that releases text it did not report as held.
                self.held.append([None, tail, None, None])
        return self._release(final=True)

    def _release(self, final):
        text = "".join(t[1] for t in self.held)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            out, pos = [], 0
            for t in self.held:
                if pos >= cut:
                    break
                end = pos + len(t[1])
                if end > cut:
                    t[1] = t[1][: cut - pos]
                out.append(t)
                pos = end
            self.held = []
            self.stopped = True
            return [t for t in out if t[0] is not None]
        if final:
            out, self.held = self.held, []
            return [t for t in out if t[0] is not None]
        keep = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        safe = len(text) - keep
        limit = len(self.held) - (1 if _pending(self.detokenizer) else 0)
        n, pos = 0, 0
        while n < limit:
            end = pos + len(self.held[n][1])
            if end > safe:
                break
            pos = end
            n += 1
        out, self.held = self.held[:n], self.held[n:]
        return out
