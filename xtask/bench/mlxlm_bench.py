# SPDX-License-Identifier: EUPL-1.2
"""mlx-lm's side of the benchmark: mlx_lm.generate.generate_step on a model directory.

    python mlxlm_bench.py --model DIR [--prompts 128,512,2048] [--decode 256] [--runs 3]
                          [--warmup 1] [--seed 0] [--dtype float32] [--json OUT]

For each prompt length it feeds the same pseudo-random token ids as the Rust side (common.py),
generates --decode tokens greedily with EOS ignored (generate_step never stops at EOS by itself),
and times every token as the generator hands it out. --warmup runs per prompt length come first
and are not counted; the medians are over --runs. The model is loaded with mlx_lm.utils.load_model
(weights only, evaluated: what `mlx_lm.load` does minus the tokenizer); "ready_s" adds one
forward pass of one token, the same as the Rust side measures. --dtype casts the loaded model's
floating-point parameters (`Module.set_dtype`; a quantised model's scales and biases too) before
that first pass: the like-for-like comparison against our `--dtype`. Which BLAS MLX calls is the
process's business (run_all.py preloads ours for the like-for-like side); the JSON records
LD_PRELOAD.

Writes the side's JSON (schema "mlxr-bench/1", see docs/benchmarks.md) to --json, or stdout.
"""

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_list(s):
    return [int(x) for x in s.split(",") if x.strip()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--prompts", default="128,512,2048", type=parse_list)
    p.add_argument("--decode", default=256, type=int)
    p.add_argument("--runs", default=3, type=int)
    p.add_argument("--warmup", default=1, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--prefill-step", default=2048, type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="cast the model's floating-point parameters to this type (default: the checkpoint's)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.decode < 2:
        p.error("--decode must be at least 2 (the decode rate needs two tokens)")
    if args.runs < 1 or not args.prompts or min(args.prompts) < 1:
        p.error("--runs and every prompt length must be at least 1")

    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    t0 = time.perf_counter()
    model, config = load_model(args.model)
    if args.dtype:
        model.set_dtype(getattr(mx, args.dtype))
    load_s = time.perf_counter() - t0
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[0]]), cache=cache))
    ready_s = time.perf_counter() - t0
    del cache
    text = {**config, **config.get("text_config", {})}
    vocab = int(text["vocab_size"])
    layers = int(text["num_hidden_layers"])
    quant = config.get("quantization") or {}

    def one_run(ids):
        prompt = mx.array(ids)
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        times, tokens = [], []
        start = time.perf_counter()
        for token, _ in generate_step(prompt, model, max_tokens=args.decode, prefill_step_size=args.prefill_step):
            times.append(time.perf_counter())
            tokens.append(int(token))
        peak = mx.get_peak_memory()
        return common.run_record(len(ids), start, times, peak), tokens

    results = []
    for n in args.prompts:
        ids = common.prompt_ids(n, vocab, args.seed)
        for _ in range(args.warmup):
            one_run(ids)
        runs, tokens = [], []
        for _ in range(args.runs):
            rec, tokens = one_run(ids)
            runs.append(rec)
        med = common.medians(runs)
        results.append({
            "prompt_tokens": n,
            "ids_fingerprint": common.fingerprint(ids),
            "runs": runs,
            "median": med,
            "generated_ids": tokens,
        })
        print(f"mlx-lm  prompt {n:5d}: ttft {med['ttft_s'] * 1e3:9.1f} ms, prefill {med['prefill_tok_s']:10.1f} tok/s, "
              f"decode {med['decode_tok_s']:8.1f} tok/s, peak {med['peak_memory_bytes'] / 1e9:.2f} GB",
              file=sys.stderr, flush=True)

    try:
        device_info = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in mx.device_info().items()}
    except Exception:  # noqa: BLE001 (older MLX, or no such call on this backend)
        device_info = {}
    doc = {
        "schema": common.SCHEMA,
        "engine": "mlx-lm",
        "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "python": platform.python_version()},
        "device": str(mx.default_device()),
        "device_info": device_info,
        "model": {
            "dir": str(args.model),
            "architecture": text.get("model_type"),
            "num_layers": layers,
            "vocab_size": vocab,
            "quant_bits": quant.get("bits"),
            "quant_group": quant.get("group_size"),
            "compute_dtype": args.dtype or "checkpoint",
        },
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "settings": {
            "prompts": args.prompts,
            "decode_tokens": args.decode,
            "runs": args.runs,
            "warmup": args.warmup,
            "seed": args.seed,
            "prefill_step": args.prefill_step,
        },
        "load_s": load_s,
        "ready_s": ready_s,
        "results": results,
    }
    out = json.dumps(doc, indent=2)
    if args.json:
        args.json.write_text(out + "\n")
    else:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
