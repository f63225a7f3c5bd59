# SPDX-License-Identifier: EUPL-1.2
"""mlx-lm's side of the memory probe (crates/mlx-metal/examples/memprobe.rs): MLX's active
and peak memory after each stage of a prefill and a few decode steps, as JSON lines.

    python memprobe.py DIR [PROMPT_TOKENS...]
"""

import json
import sys


def main():
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from pathlib import Path

    path = Path(sys.argv[1])
    lengths = [int(a) for a in sys.argv[2:]] or [128, 2048]
    model, _ = load_model(path)
    vocab = model.args.vocab_size

    def report(stage, n):
        print(json.dumps({"engine": "mlx-lm", "prompt": n, "stage": stage,
                          "active": mx.get_active_memory(), "peak": mx.get_peak_memory()}), flush=True)

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[0]]), cache=cache))
    del cache
    mx.clear_cache()
    report("weights", 0)
    for n in lengths:
        ids = mx.array([[(i * 7919) % vocab for i in range(n)]])
        mx.clear_cache()
        mx.reset_peak_memory()
        cache = make_prompt_cache(model)
        if n > 1:
            model(ids[:, : n - 1], cache=cache)
            mx.eval([c.state for c in cache])
            report("prefill", n)
            mx.clear_cache()
        y = mx.argmax(model(ids[:, n - 1 :], cache=cache), axis=-1)
        mx.eval(y)
        report("first_token", n)
        for _ in range(8):
            y = mx.argmax(model(y.reshape(1, 1), cache=cache), axis=-1)
            mx.eval(y)
        report("decode_8", n)
        del cache


if __name__ == "__main__":
    main()
