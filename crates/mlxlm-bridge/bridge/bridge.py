# SPDX-License-Identifier: EUPL-1.2
"""The mlx-lm bridge of the Rust backend "mlx_lm": JSON Lines on stdin and stdout, protocol 1.

Shipped inside the Rust crate `mlxlm-bridge` and written out at run time; one process serves one
model. The protocol is documented field by field in the crate documentation (src/lib.rs), which
is the reference; this file and the bridge_*.py modules shipped beside it implement it: the
protocol's plumbing (bridge_protocol.py), request settings (bridge_settings.py), token texts
(bridge_text.py) and the command handlers (bridge_generate.py, bridge_batch.py,
bridge_inspect.py).

Standard output carries protocol lines only: at start-up the original stdout is kept on a private
descriptor and descriptor 1 is pointed at stderr, so that a print in a library (or in C code)
cannot corrupt the stream. Requests are read by a thread of their own, so a `cancel` reaches a
generation between two tokens (or between two prefill chunks) rather than after it.
"""

import os
import platform
import queue
import signal
import sys
import threading
import traceback

# The modules below ship beside this file. Python puts a script's directory first on sys.path,
# except in safe-path mode (PYTHONSAFEPATH), so it is added here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bridge_batch import Batches  # noqa: E402
from bridge_generate import Generation  # noqa: E402
from bridge_inspect import Inspection  # noqa: E402
from bridge_protocol import PROTOCOL, BridgeError, Cancelled, Output, Requests, clean, read_requests  # noqa: E402

# Set by the parent to the directory it wrote these scripts to (see remove_own_directory).
REMOVE_DIR_ENV = "MLXR_BRIDGE_REMOVE_DIR"


def remove_own_directory():
    """Removes the directory this script and its modules were written to, when the parent asked
    for it (`MLXR_BRIDGE_REMOVE_DIR` naming this very directory): every module above is imported
    by now, so nothing needs the files again. Done first thing, before mlx-lm is imported, so the
    directory goes however the parent ends later (a signal, `kill -9`), not by its destructors.
    The sources stay in `linecache` first, so that tracebacks still show their lines."""
    asked = os.environ.pop(REMOVE_DIR_ENV, None)
    here = os.path.dirname(os.path.abspath(__file__))
    if not asked or os.path.abspath(asked) != here:
        return
    try:
        import linecache

        for name in os.listdir(here):
            path = os.path.join(here, name)
            if name.endswith(".py") and os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    lines = f.readlines()
                # An entry without an mtime is never checked against the file (as for sources
                # read through a module's loader).
                linecache.cache[path] = (sum(len(line) for line in lines), None, lines, path)
    except Exception:  # noqa: BLE001 - tracebacks without source lines are still tracebacks
        pass
    import shutil

    shutil.rmtree(here, ignore_errors=True)
    if here in sys.path:
        sys.path.remove(here)


class Bridge(Generation, Batches, Inspection):
    """The main loop's state: the one loaded model and the handlers of the commands (generation in
    bridge_generate.py, prompt lists in bridge_batch.py, attention inspection in
    bridge_inspect.py)."""

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
        dtype = msg.get("dtype")
        if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
            raise BridgeError(f"load: dtype must be float32, bfloat16 or float16, not {dtype!r}", "invalid")
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
        if dtype is not None:
            # Every floating-point parameter, as mlx-lm's users do it; packed quantised weights stay.
            model.set_dtype(getattr(mx, dtype))
            mx.eval(model.parameters())
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
                "compute_dtype": self.compute_dtype(),
                "chat_template": self.chat_template(),
            }
        )

    def chat_template(self):
        """The tokenizer's chat template text, when it has one (a string)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def compute_dtype(self):
        """The type of most of the model's floating-point parameters."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        counts = {}
        for _, p in tree_flatten(self.model.parameters()):
            if mx.issubdtype(p.dtype, mx.floating):
                name = str(p.dtype).removeprefix("mlx.core.")
                counts[name] = counts.get(name, 0) + 1
        return max(counts, key=counts.get) if counts else None


def main():
    remove_own_directory()
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
