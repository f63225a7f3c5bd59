# SPDX-License-Identifier: EUPL-1.2
"""The mlx-lm bridge of the Rust backend "mlx_lm": JSON Lines on stdin and stdout, protocol 1.

Shipped inside the Rust crate `mlxlm-bridge` and written out at run time; one process serves one
model. The protocol is documented field by field in the crate documentation (src/lib.rs), which
is the reference; this file implements it.

Standard output carries protocol lines only: at start-up the original stdout is kept on a private
descriptor and descriptor 1 is pointed at stderr, so that a print in a library (or in C code)
cannot corrupt the stream. Requests are read by a thread of their own, so a `cancel` reaches a
generation between two tokens (or between two prefill chunks) rather than after it.
"""

import json
import math
import os
import platform
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque

PROTOCOL = 1
LOGITS_MODES = ("none", "logits", "logprobs")


class BridgeError(Exception):
    """A failure reported to the client with a message and a kind, without a traceback."""

    def __init__(self, message, kind="failed", operation=None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.operation = operation


class Cancelled(Exception):
    """The client cancelled the request (or asked the bridge to quit)."""


def clean(text):
    """`text` as valid UTF-8 (lone surrogates become '?'), so that every line is valid JSON."""
    return text.encode("utf-8", "replace").decode("utf-8")


def num(x):
    """A float for JSON: a number when finite, else the string "inf", "-inf" or "nan"."""
    x = float(x)
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def nums(array):
    """A 1-D array as a list for JSON (see `num`)."""
    import mlx.core as mx
    import numpy as np

    values = np.array(array.astype(mx.float32))
    if np.isfinite(values).all():
        return values.astype(np.float64).tolist()
    return [num(v) for v in values.tolist()]


class Output:
    """Protocol lines to the client; one whole line per write, from any thread."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, obj):
        line = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        data = line.encode("utf-8") + b"\n"
        with self._lock:
            self._stream.write(data)
            self._stream.flush()

    def error(self, rid, kind, message, cause=None, operation=None):
        event = {"id": rid, "event": "error", "kind": kind, "message": clean(message), "cause": cause}
        if operation is not None:
            event["operation"] = operation
        self.send(event)


class Requests:
    """Cancellation state shared by the reader thread and the main loop."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cancelled = set()
        self._quitting = False

    def cancel(self, rid):
        if isinstance(rid, (int, str)):
            with self._lock:
                self._cancelled.add(rid)

    def quit(self):
        with self._lock:
            self._quitting = True

    def is_cancelled(self, rid):
        with self._lock:
            return self._quitting or rid in self._cancelled

    def forget(self, rid):
        with self._lock:
            self._cancelled.discard(rid)


def read_lines(fd):
    """Lines from a file descriptor, read with os.read: no buffered file object, so no lock that a
    daemon thread could hold while the interpreter shuts down."""
    pending = bytearray()
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if pending.strip():
                yield bytes(pending)
            return
        pending += chunk
        start = 0
        while True:
            end = pending.find(b"\n", start)
            if end < 0:
                break
            yield bytes(pending[start:end])
            start = end + 1
        del pending[:start]


def read_requests(fd, requests, commands, out):
    """The reader thread: `cancel` and `quit` take effect at once, the rest queue for the main loop."""
    for raw in read_lines(fd):
        raw = raw.strip()
        if not raw:
            continue
        try:
            msg = json.loads(raw)
            if not isinstance(msg, dict):
                raise ValueError("a request must be a JSON object")
        except ValueError as exc:
            out.error(None, "invalid", f"parse error: {exc}")
            continue
        cmd = msg.get("cmd")
        if cmd == "cancel":
            requests.cancel(msg.get("target"))
            continue
        if cmd == "quit":
            requests.quit()
            commands.put(msg)
            return
        commands.put(msg)
    requests.quit()
    commands.put(None)


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


def token_event(rid, t):
    event = {"id": rid, "event": "token", "token": clean(t[1]), "token_id": int(t[0])}
    if t[2] is not None:
        event["logprob"] = num(t[2])
    if t[3] is not None:
        event["logits"] = t[3]
    return event


class Bridge:
    """The main loop's state: the one loaded model and the handlers of the commands."""

    def __init__(self, out, requests):
        self.out = out
        self.requests = requests
        self.model = None
        self.tokenizer = None
        self.config = None
        self.stream = None
        self.max_kv = None
        self.handlers = {
            "load": self.load,
            "info": self.info,
            "generate": self.generate,
            "chat": self.chat,
            "classify": self.classify,
            "batch_generate": self.batch_generate,
            "inspect": self.inspect,
        }

    def handle(self, msg):
        rid = msg.get("id")
        cmd = msg.get("cmd")
        try:
            if not isinstance(rid, (int, str)) or isinstance(rid, bool):
                rid = None
                raise BridgeError(f"{cmd}: the request has no valid 'id'", "invalid")
            handler = self.handlers.get(cmd)
            if handler is None:
                raise BridgeError(f"unknown command: {cmd}", "invalid")
            if cmd != "load" and self.model is None:
                raise BridgeError(f"{cmd}: no model loaded", "invalid")
            handler(rid, msg)
        except Cancelled:
            self.out.send({"id": rid, "event": "cancelled"})
        except BridgeError as exc:
            self.out.error(rid, exc.kind, exc.message, operation=exc.operation)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the client
            self.out.error(rid, "failed", f"{cmd}: {type(exc).__name__}: {exc}", clean(traceback.format_exc()))
        finally:
            self.requests.forget(rid)

    def check(self, rid):
        if self.requests.is_cancelled(rid):
            raise Cancelled()

    # ---- load and info -------------------------------------------------------------------------

    def load(self, rid, msg):
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.generate import generation_stream

        if self.model is not None:
            raise BridgeError("load: a model is already loaded (one process serves one model)", "invalid")
        path = msg.get("path")
        if not isinstance(path, str) or not path:
            raise BridgeError("load: missing 'path'", "invalid")
        if not os.path.isdir(path):
            raise BridgeError(f"load: no model directory at {path}")
        adapter = msg.get("adapter_path")
        if adapter is not None and not os.path.exists(adapter):
            raise BridgeError(f"load: no adapter at {adapter}")
        context = msg.get("context_length")
        if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
            raise BridgeError(f"load: context_length must be a positive integer, not {context!r}", "invalid")
        device = msg.get("device") or "auto"
        if device == "cpu":
            mx.set_default_device(mx.cpu)
            stream = mx.new_stream(mx.cpu)
        elif device == "gpu":
            if not mx.is_available(mx.gpu):
                raise BridgeError("load: device gpu was requested but MLX has no GPU on this machine")
            mx.set_default_device(mx.gpu)
            stream = mx.new_stream(mx.gpu)
        elif device == "auto":
            stream = generation_stream
        else:
            raise BridgeError(f"load: device must be auto, gpu or cpu, not {device!r}", "invalid")
        model, tokenizer, config = mlx_lm.load(path, adapter_path=adapter, return_config=True)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.stream, self.max_kv = stream, context
        self.out.send({"id": rid, "event": "loaded", "model_type": str(config.get("model_type", ""))})

    def info(self, rid, msg):
        cfg = self.config
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}

        def pick(*keys):
            for key in keys:
                for source in (text, cfg):
                    value = source.get(key)
                    if isinstance(value, int) and not isinstance(value, bool):
                        return value
            return None

        layers = getattr(self.model, "layers", None)
        quant = cfg.get("quantization") or cfg.get("quantization_config") or {}
        self.out.send(
            {
                "id": rid,
                "event": "info",
                "model_type": str(cfg.get("model_type", "")),
                "vocab_size": pick("vocab_size") or len(self.tokenizer),
                "num_layers": len(layers) if layers is not None else (pick("num_hidden_layers", "n_layer") or 0),
                "hidden_size": pick("hidden_size", "d_model", "n_embd") or 0,
                "quant_bits": quant.get("bits") if isinstance(quant, dict) else None,
                "quant_group": quant.get("group_size") if isinstance(quant, dict) else None,
                "context_length": self.max_kv or pick("max_position_embeddings"),
            }
        )

    # ---- generation ----------------------------------------------------------------------------

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
        settings = Settings(msg.get("settings"))
        if not self.tokenizer.has_chat_template:
            raise BridgeError(
                "chat: the model's tokenizer has no chat template", "unsupported", "chat without a chat template"
            )
        ids = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt=True
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

    # ---- classify and batch generation ---------------------------------------------------------

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

    # ---- attention inspection ------------------------------------------------------------------

    def inspect(self, rid, msg):
        """One prefill with the rotary embedding of every attention module wrapped, capturing the
        queries and keys it returns (post-norm, post-RoPE): the first call is the queries, the
        second the keys, as in mlx-lm's attention modules. Files: keys_<layer>.bin and
        queries_<layer>.bin in `dir`, little-endian float32 in [heads, seq_len, head_dim] order."""
        import mlx.core as mx
        import mlx.nn as nn
        import numpy as np
        from mlx_lm.models.cache import make_prompt_cache

        directory = msg.get("dir")
        if not isinstance(directory, str) or not os.path.isdir(directory):
            raise BridgeError("inspect: 'dir' must be an existing directory", "invalid")
        ids = self.encode(msg.get("prompt"), "inspect")
        layers = getattr(self.model, "layers", None) or []
        modules = []
        for layer in layers:
            found = None
            for _, module in layer.named_modules():
                if all(hasattr(module, a) for a in ("q_proj", "k_proj", "rope")):
                    found = module
                    break
            modules.append(found)
        if not modules or any(m is None for m in modules):
            raise BridgeError(
                "inspect: no attention modules with q_proj, k_proj and rope in this model",
                "unsupported",
                "attention inspection of this architecture",
            )

        class Capture(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.seen = []

            def __call__(self, x, *args, **kwargs):
                y = self.inner(x, *args, **kwargs)
                self.seen.append(y)
                return y

        originals = [m.rope for m in modules]
        captures = [Capture(r) for r in originals]
        self.check(rid)
        try:
            for module, capture in zip(modules, captures):
                module.rope = capture
            with mx.stream(self.stream):
                cache = make_prompt_cache(self.model, self.max_kv)
                mx.eval(self.model(mx.array(ids)[None], cache=cache))
        finally:
            for module, original in zip(modules, originals):
                module.rope = original
        shapes = None
        for i, capture in enumerate(captures):
            if len(capture.seen) != 2:
                raise BridgeError(
                    f"inspect: layer {i} called its rotary embedding {len(capture.seen)} times, not 2",
                    "unsupported",
                    "attention inspection of this architecture",
                )
            q, k = capture.seen
            if q.ndim != 4 or k.ndim != 4 or q.shape[2] != len(ids) or k.shape[2] != len(ids) or q.shape[3] != k.shape[3]:
                raise BridgeError(
                    f"inspect: unexpected query/key shapes {q.shape} / {k.shape} in layer {i}",
                    "unsupported",
                    "attention inspection of this architecture",
                )
            layer_shapes = (q.shape[1], k.shape[1], k.shape[3])
            if shapes is not None and layer_shapes != shapes:
                raise BridgeError(
                    "inspect: layers differ in head counts or head size",
                    "unsupported",
                    "attention inspection of this architecture",
                )
            shapes = layer_shapes
            np.array(k[0].astype(mx.float32)).astype("<f4").tofile(os.path.join(directory, f"keys_{i}.bin"))
            np.array(q[0].astype(mx.float32)).astype("<f4").tofile(os.path.join(directory, f"queries_{i}.bin"))
        self.out.send(
            {
                "id": rid,
                "event": "inspected",
                "num_layers": len(captures),
                "num_q_heads": shapes[0],
                "num_kv_heads": shapes[1],
                "seq_len": len(ids),
                "head_dim": shapes[2],
                "architecture": str(self.config.get("model_type", "")),
            }
        )


def main():
    # The parent decides when this process ends: Ctrl-C in a terminal reaches the whole process
    # group, and the parent closes our stdin or sends quit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out = Output(protocol_out)
    try:
        import mlx.core as mx
        import mlx_lm
    except BaseException as exc:  # noqa: BLE001 - reported, then exit
        out.error(None, "failed", f"cannot import mlx_lm: {type(exc).__name__}: {exc}", clean(traceback.format_exc()))
        return 1
    out.send(
        {
            "event": "ready",
            "protocol": PROTOCOL,
            "mlx_lm": str(getattr(mlx_lm, "__version__", "")),
            "mlx": str(getattr(mx, "__version__", "")),
            "python": platform.python_version(),
        }
    )
    requests = Requests()
    commands = queue.Queue()
    reader = threading.Thread(target=read_requests, args=(sys.stdin.fileno(), requests, commands, out), daemon=True)
    reader.start()
    bridge = Bridge(out, requests)
    while True:
        msg = commands.get()
        if msg is None:
            return 0
        if msg.get("cmd") == "quit":
            out.send({"id": msg.get("id"), "event": "bye"})
            return 0
        bridge.handle(msg)


if __name__ == "__main__":
    status = main()
    # Every protocol line is flushed when written. Leaving without the interpreter's shutdown
    # avoids its hazards (the daemon reader thread, native libraries' teardown) and is quick.
    sys.stderr.flush()
    os._exit(status)
