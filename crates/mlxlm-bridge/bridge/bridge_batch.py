# SPDX-License-Identifier: EUPL-1.2
"""The classify and batch_generate commands: one prefill and one sample per prompt, and mlx-lm's
BatchGenerator with per-prompt stop rules."""

import time

from bridge_protocol import BridgeError, clean, num, nums, token_event
from bridge_settings import Settings
from bridge_text import Assembler


class Batches:
    """The handlers of `Bridge` that take a list of prompts."""

    def prompts(self, msg, cmd):
        prompts = msg.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise BridgeError(f"{cmd}: 'prompts' must be a list of strings", "invalid")
        return prompts

    def classify(self, rid, msg):
        """One prefill per prompt with a fresh cache, then one sample at the last position.

        mlx-lm has no classification call; this is the first step of its generate_step (same
        sampler and logits processors), without the decode that follows.
        """
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        prompts = self.prompts(msg, "classify")
        s = Settings(msg.get("settings"))
        encoded = [self.encode(p, "classify") for p in prompts]
        sampler = s.sampler()
        processors = s.processors()
        s.seed_rng()
        mx.reset_peak_memory()
        results = []
        tic = time.perf_counter()
        with mx.stream(self.stream):
            for ids in encoded:
                self.check(rid)
                tokens = mx.array(ids)
                cache = make_prompt_cache(self.model, self.max_kv)
                raw = self.model(tokens[None], cache=cache)[:, -1, :]
                logits = raw
                for processor in processors:
                    logits = processor(tokens, logits)
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                sampled = sampler(logprobs)
                mx.eval(sampled, logprobs, raw)
                token = int(sampled.item())
                result = {"token_id": token, "token": clean(self.tokenizer.decode([token]))}
                if s.logits != "none":
                    result["logprob"] = num(logprobs[0, token].item())
                    result["logits"] = nums(raw[0] if s.logits == "logits" else logprobs[0])
                results.append(result)
        elapsed = time.perf_counter() - tic
        prompt_tokens = sum(len(ids) for ids in encoded)
        self.out.send(
            {
                "id": rid,
                "event": "classified",
                "results": results,
                "prompt_tokens": prompt_tokens,
                "generation_tokens": len(results),
                "prompt_time": elapsed,
                "generation_time": 0.0,
                "prompt_tps": prompt_tokens / elapsed if elapsed > 0 else 0.0,
                "generation_tps": 0.0,
                "peak_memory": int(mx.get_peak_memory()),
                "active_memory": int(mx.get_active_memory()),
            }
        )

    def batch_generate(self, rid, msg):
        """mlx-lm's BatchGenerator (the engine of its batch_generate), with per-prompt stop rules."""
        import mlx.core as mx

        try:
            from mlx_lm.generate import BatchGenerator
        except ImportError:
            raise BridgeError(
                "batch_generate: this mlx-lm has no BatchGenerator",
                "unsupported",
                "batch generation with this mlx-lm version",
            ) from None
        prompts = self.prompts(msg, "batch_generate")
        s = Settings(msg.get("settings"))
        if s.logits == "logits":
            raise BridgeError(
                "batch_generate: raw logits are not available in batch generation",
                "unsupported",
                "raw logits in batch generation (log-probabilities are available)",
            )
        results = [{"tokens": [], "error": None} for _ in prompts]
        encoded = {}
        for i, prompt in enumerate(prompts):
            try:
                encoded[i] = self.encode(prompt, "batch_generate")
            except BridgeError as exc:
                results[i]["error"] = {"kind": exc.kind, "message": exc.message}
        eos = [] if s.ignore_eos else sorted(self.tokenizer.eos_token_ids)
        stop_tokens = [[t] for t in sorted(set(eos) | set(s.stop_tokens))]
        s.seed_rng()
        mx.reset_peak_memory()
        stats = None
        if encoded:
            order = sorted(encoded)
            gen = BatchGenerator(
                self.model,
                max_tokens=s.max_tokens,
                stop_tokens=stop_tokens or None,
                sampler=s.sampler(),
                logits_processors=s.processors() or None,
                max_kv_size=self.max_kv,
                stream=self.stream,
            )
            try:
                uids = gen.insert([encoded[i] for i in order], [s.max_tokens] * len(order))
                index = dict(zip(uids, order))
                assemblers = {uid: Assembler(self.tokenizer, s.stop_strings) for uid in uids}
                finished = set()
                with gen.stats() as stats:
                    while True:
                        self.check(rid)
                        responses = gen.next_generated()
                        if not responses:
                            break
                        for r in responses:
                            if r.uid in finished:
                                continue
                            out = results[index[r.uid]]["tokens"]
                            assembler = assemblers[r.uid]
                            if r.finish_reason == "stop":
                                ready = assembler.finish()
                                finished.add(r.uid)
                            else:
                                logprob = r.logprobs[r.token].item() if s.logits != "none" else None
                                logits = nums(r.logprobs) if s.logits == "logprobs" else None
                                ready = assembler.add(r.token, logprob, logits)
                                if assembler.stopped:
                                    finished.add(r.uid)
                                    if r.finish_reason is None:
                                        gen.remove([r.uid])
                                elif r.finish_reason is not None:
                                    ready += assembler.finish()
                                    finished.add(r.uid)
                            out.extend(token_event(rid, t) for t in ready)
                        if len(finished) == len(uids):
                            break
            finally:
                gen.close()
        for result in results:
            for t in result["tokens"]:
                del t["id"], t["event"]
        generated = sum(len(r["tokens"]) for r in results)
        self.out.send(
            {
                "id": rid,
                "event": "batch",
                "results": results,
                "prompt_tokens": stats.prompt_tokens if stats else 0,
                "generation_tokens": generated,
                "prompt_time": stats.prompt_time if stats else 0.0,
                "generation_time": stats.generation_time if stats else 0.0,
                "prompt_tps": stats.prompt_tps if stats else 0.0,
                "generation_tps": stats.generation_tps if stats else 0.0,
                "peak_memory": int(mx.get_peak_memory()),
                "active_memory": int(mx.get_active_memory()),
            }
        )
