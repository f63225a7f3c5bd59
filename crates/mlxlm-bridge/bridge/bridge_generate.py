# SPDX-License-Identifier: EUPL-1.2
"""The generate and chat commands: prompts encoded as mlx-lm does, and tokens streamed from
mlx-lm's generate_step with cancellation between tokens."""

import time
from collections import deque

from bridge_protocol import BridgeError, nums, token_event
from bridge_settings import Settings
from bridge_text import Assembler


class Generation:
    """The generation handlers of `Bridge` (which holds the model, tokenizer and stream)."""

    def encode(self, prompt, cmd):
        if not isinstance(prompt, str) or not prompt:
            raise BridgeError(f"{cmd}: the prompt is empty", "empty_prompt")
        tok = self.tokenizer
        # As mlx-lm's stream_generate: special tokens unless the prompt starts with BOS already.
        add_special = tok.bos_token is None or not prompt.startswith(tok.bos_token)
        ids = list(tok.encode(prompt, add_special_tokens=add_special))
        if not ids:
            raise BridgeError(f"{cmd}: the prompt is empty after tokenisation", "empty_prompt")
        return ids

    def generate(self, rid, msg):
        settings = Settings(msg.get("settings"))
        self.stream_tokens(rid, self.encode(msg.get("prompt"), "generate"), settings)

    def chat(self, rid, msg):
        messages = msg.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BridgeError("chat: no messages", "empty_prompt")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BridgeError("chat: every message needs a string 'role' and 'content'", "invalid")
        tools = msg.get("tools") or None
        if tools is not None and not isinstance(tools, list):
            raise BridgeError("chat: 'tools' must be a list", "invalid")
        settings = Settings(msg.get("settings"))
        if not self.tokenizer.has_chat_template:
            raise BridgeError(
                "chat: the model's tokenizer has no chat template", "unsupported", "chat without a chat template"
            )
        # The fields Hugging Face templates read: role, content, and tool_calls, tool_call_id, name.
        keys = ("role", "content", "tool_calls", "tool_call_id", "name")
        ids = self.tokenizer.apply_chat_template(
            [{k: m[k] for k in keys if k in m} for m in messages], tools=tools, add_generation_prompt=True
        )
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        ids = list(ids)
        if not ids:
            raise BridgeError("chat: the rendered conversation is empty", "empty_prompt")
        self.stream_tokens(rid, ids, settings)

    def stream_tokens(self, rid, ids, s):
        """Generates with mlx-lm's generate_step and streams token events, then `done`.

        generate_step is the loop under mlx-lm's stream_generate; it is driven directly so that a
        cancel is seen between tokens and between prefill chunks, so that EOS can be ignored and
        extra stop tokens and strings applied per request. Speeds are computed as stream_generate
        computes them.
        """
        import mlx.core as mx
        from mlx_lm.generate import generate_step, wired_limit

        self.check(rid)
        sampler = s.sampler()
        processors = s.processors()
        raw_logits = deque()
        if s.logits == "logits":

            def capture(_tokens, logits):
                raw_logits.append(logits)
                return logits

            processors = [capture] + processors
        eos = set() if s.ignore_eos else set(self.tokenizer.eos_token_ids)
        stops = set(s.stop_tokens)
        assembler = Assembler(self.tokenizer, s.stop_strings)
        s.seed_rng()
        mx.reset_peak_memory()

        def progress(_done, _total):
            self.check(rid)

        emitted = 0
        sampled = 0
        reason = "length"
        prompt_time = 0.0
        tic = time.perf_counter()
        first = True
        with wired_limit(self.model, [self.stream]):
            steps = generate_step(
                mx.array(ids),
                self.model,
                self.stream,
                max_tokens=s.max_tokens,
                sampler=sampler,
                logits_processors=processors or None,
                max_kv_size=self.max_kv,
                prompt_progress_callback=progress,
            )
            try:
                for token, logprobs in steps:
                    if first:
                        prompt_time = time.perf_counter() - tic
                        tic = time.perf_counter()
                        first = False
                    raw = raw_logits.popleft() if raw_logits else None
                    self.check(rid)
                    sampled += 1
                    if token in eos:
                        reason = "stop"
                        break
                    if token in stops:
                        reason = "stop_token"
                        break
                    logprob = logprobs[token].item() if s.logits != "none" else None
                    logits = None
                    if s.logits == "logprobs":
                        logits = nums(logprobs)
                    elif s.logits == "logits" and raw is not None:
                        logits = nums(raw[0])
                    for t in assembler.add(token, logprob, logits):
                        self.out.send(token_event(rid, t))
                        emitted += 1
                    if assembler.stopped:
                        reason = "stop_string"
                        break
            finally:
                steps.close()
        generation_time = 0.0 if first else time.perf_counter() - tic
        for t in assembler.finish():
            self.out.send(token_event(rid, t))
            emitted += 1
        self.out.send(
            {
                "id": rid,
                "event": "done",
                "finish_reason": reason,
                "prompt_tokens": len(ids),
                "generation_tokens": emitted,
                "sampled_tokens": sampled,
                "prompt_time": prompt_time,
                "generation_time": generation_time,
                "prompt_tps": len(ids) / prompt_time if prompt_time > 0 else 0.0,
                "generation_tps": sampled / generation_time if generation_time > 0 else 0.0,
                "peak_memory": int(mx.get_peak_memory()),
                "active_memory": int(mx.get_active_memory()),
            }
        )
