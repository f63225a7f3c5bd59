# SPDX-License-Identifier: EUPL-1.2
"""The `settings` object of generate, chat, classify and batch_generate, checked, and the
mlx-lm sampler and logits processors it asks for."""

import math

from bridge_protocol import BridgeError

LOGITS_MODES = ("none", "logits", "logprobs")


class Settings:
    """The `settings` object of generate, chat, classify and batch_generate, checked."""

    def __init__(self, raw):
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise BridgeError("settings must be an object", "invalid")
        self.max_tokens = _int(raw, "max_tokens", 256, minimum=1)
        self.temperature = _float(raw, "temperature", 0.0, minimum=0.0)
        self.top_k = _int(raw, "top_k", 0, minimum=0)
        self.top_p = _float(raw, "top_p", 1.0, minimum=0.0)
        self.min_p = _float(raw, "min_p", 0.0, minimum=0.0)
        self.repetition_penalty = _float(raw, "repetition_penalty", 1.0, minimum=0.0)
        self.repetition_context_size = _int(raw, "repetition_context_size", 20, minimum=1)
        self.stop_tokens = _list(raw, "stop_tokens", int)
        self.stop_strings = [s for s in _list(raw, "stop_strings", str) if s]
        seed = raw.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise BridgeError(f"settings.seed must be a non-negative integer, not {seed!r}", "invalid")
        self.seed = seed
        self.logits = raw.get("logits", "none")
        if self.logits not in LOGITS_MODES:
            raise BridgeError(f"settings.logits must be one of {', '.join(LOGITS_MODES)}", "invalid")
        self.ignore_eos = bool(raw.get("ignore_eos", False))

    def sampler(self):
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(temp=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def processors(self):
        from mlx_lm.sample_utils import make_logits_processors

        penalty = self.repetition_penalty if self.repetition_penalty != 1.0 else None
        return make_logits_processors(
            repetition_penalty=penalty, repetition_context_size=self.repetition_context_size
        )

    def seed_rng(self):
        if self.seed is not None:
            import mlx.core as mx

            mx.random.seed(self.seed % (1 << 64))


def _int(raw, key, default, minimum):
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BridgeError(f"settings.{key} must be an integer >= {minimum}, not {value!r}", "invalid")
    return value


def _float(raw, key, default, minimum):
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise BridgeError(f"settings.{key} must be a finite number >= {minimum}, not {value!r}", "invalid")
    return float(value)


def _list(raw, key, kind):
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise BridgeError(f"settings.{key} must be a list of {kind.__name__}", "invalid")
    return value
