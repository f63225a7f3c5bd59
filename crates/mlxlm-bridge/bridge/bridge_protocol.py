# SPDX-License-Identifier: EUPL-1.2
"""The protocol's plumbing: the errors reported to the client, text and numbers made safe for
JSON, the output lines, and the reader thread with the cancellation state it shares with the main
loop."""

import json
import math
import os
import threading

PROTOCOL = 1


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


def token_event(rid, t):
    event = {"id": rid, "event": "token", "token": clean(t[1]), "token_id": int(t[0])}
    if t[2] is not None:
        event["logprob"] = num(t[2])
    if t[3] is not None:
        event["logits"] = t[3]
    return event
