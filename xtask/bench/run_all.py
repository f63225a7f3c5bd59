# SPDX-License-Identifier: EUPL-1.2
"""The benchmark driver: our engine and mlx-lm on one model directory, in one run, compared.

    python run_all.py --bench-bin PATH/bench --model DIR [--python PY] [--runs 3] [--warmup 1]
                      [--prompts 128,512,2048] [--decode 256] [--seed 0] [--rounds 1]
                      [--bandwidth GBps | --bandwidth-json FILE] [--bandwidth-size-mb 1024] [--no-public]
                      [--same-blas LIB] [--json OUT] [--raw-dir DIR]

`--bench-bin` is the compiled `bench` example of mlx-metal (`cargo build --release -p mlx-metal
--example bench`); `cargo xtask bench` builds it and runs this script. Nothing here needs cargo,
so on a machine with only the binary, python3 with mlx and mlx-lm, this runs as it is.

With --same-blas LIB a third side runs: mlx-lm again, in the compute type our side reported
(`model.compute_dtype` of its JSON; float32 for a 16-bit checkpoint on an x86 CPU) and with LIB
preloaded (LD_PRELOAD: the optimised BLAS our binaries link; mlx-lm's Python cannot use our link
order). Its ratios are the like-for-like ones ("same BLAS and dtype"); the plain mlx-lm side stays
what a user of mlx-lm gets by default. `cargo xtask bench` passes --same-blas on Linux whenever
setup installed OpenBLAS.

Steps: the memory bandwidth (--bandwidth, or measured by bandwidth.py); then --rounds rounds,
each running our side (bench) and mlx-lm's side (mlxlm_bench.py), each in its own process, the
order alternating from round to round; then the medians over every round's runs, the ratios
ours / mlx-lm, decode as a percentage of the memory-bandwidth roofline, a table on stdout and the
combined JSON (schema "mlxr-bench-report/1", see docs/benchmarks.md) at --json.

Roofline: a decode step reads every weight once, except the embedding table, of which it gathers
one row; when the embedding is tied to the output head the head's matmul reads it all. So

    bytes_per_token = sum of all safetensors tensor bytes
                      - embedding bytes (embed_tokens.{weight,scales,biases})
                      + (embedding bytes if tied, else embedding bytes / vocab)
    roofline tok/s  = bandwidth / bytes_per_token

KV-cache reads, activations and logits are left out (a few percent at these prompt lengths), so
the roofline is an upper bound.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

OURS, PUBLIC, MLXLM, SAME = "ours", "ours-public", "mlx-lm", "mlx-lm-same"
SIDES = (OURS, PUBLIC, MLXLM, SAME)
# The ratio columns: (key in a summary row, the mlx-lm side it divides by, its heading).
RATIOS = (("ratio", MLXLM, "ours/mlx-lm"), ("ratio_same", SAME, "ours/same"))
EMBED_SUFFIXES = ("embed_tokens.weight", "embed_tokens.scales", "embed_tokens.biases")


def parse_list(s):
    return [int(x) for x in s.split(",") if x.strip()]


# --- the model's bytes ------------------------------------------------------------------------


def safetensors_tensors(path):
    """{name: bytes} from a safetensors header (no tensor data is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def model_info(model_dir):
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    text = {**config, **(config.get("text_config") or {})}
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("model*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(safetensors_tensors(model_dir / f))
    total = sum(tensors.values())
    embed = sum(b for k, b in tensors.items() if k.endswith(EMBED_SUFFIXES))
    tied = not any(k.endswith("lm_head.weight") for k in tensors)
    vocab = int(text["vocab_size"])
    per_token = total - embed + (embed if tied else embed / vocab)
    quant = config.get("quantization") or {}
    return {
        "dir": str(model_dir),
        "name": model_dir.name,
        "architecture": text.get("model_type"),
        "num_layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "vocab_size": vocab,
        "quant_bits": quant.get("bits"),
        "quant_group": quant.get("group_size"),
        "dtype": text.get("torch_dtype") or text.get("dtype"),
        "tied_embeddings": tied,
        "weight_bytes_total": total,
        "embedding_bytes": embed,
        "weight_bytes_per_token": per_token,
        "bytes_formula": "total - embedding + (embedding if tied else embedding / vocab)",
    }


# --- running the sides ------------------------------------------------------------------------


def run_side(cmd, label, env=None):
    print(f"== {label}: {' '.join(str(c) for c in cmd)}", file=sys.stderr, flush=True)
    # Each run compiles MLX's CUDA kernels into an empty PTX cache of its own: MLX keeps them in
    # /tmp/mlx/<version>/ptx by default, where the side that runs second would find the first's, and
    # 'load + 1 token' would measure the order (12-16 s on a GPU, docs/benchmarks.md). No effect off CUDA.
    ptx = tempfile.mkdtemp(prefix="mlxr-bench-ptx-")
    try:
        r = subprocess.run([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                           env={**(os.environ if env is None else env), "MLX_PTX_CACHE_DIR": ptx})
    finally:
        shutil.rmtree(ptx, ignore_errors=True)
    if r.returncode != 0:
        raise SystemExit(f"run_all: {label} failed with exit status {r.returncode}")


def side_args(args):
    return ["--model", args.model, "--prompts", ",".join(map(str, args.prompts)), "--decode", args.decode,
            "--runs", args.runs, "--warmup", args.warmup, "--seed", args.seed]


def merge_rounds(docs):
    """One side's documents from several rounds as one: runs pooled, medians over all of them."""
    docs = [d for d in docs if d and not d.get("skipped")]
    if not docs:
        return None
    out = dict(docs[0])
    out.pop("public", None)
    for key in ("load_s", "ready_s"):
        vals = [d[key] for d in docs if d.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
        out[key + "_rounds"] = vals
    results = []
    for i, first in enumerate(docs[0]["results"]):
        runs = [r for d in docs for r in d["results"][i]["runs"]]
        results.append({**first, "runs": runs, "median": common.medians(runs),
                        "generated_ids": docs[-1]["results"][i]["generated_ids"]})
    out["results"] = results
    out["rounds"] = len(docs)
    return out


# --- the comparison ---------------------------------------------------------------------------


def ratio(a, b):
    return a / b if a is not None and b else None


def agreement(a, b):
    prefix = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"same": sum(x == y for x, y in zip(a, b)), "common_prefix": prefix, "of": min(len(a), len(b))}


def summarise(sides, info, roofline):
    ours, pub = sides.get(OURS), sides.get(PUBLIC)
    rows = []
    first = next(sides[n] for n in SIDES if sides.get(n) and n != PUBLIC)
    for i, r in enumerate(first["results"]):
        n = r["prompt_tokens"]
        row = {"prompt_tokens": n}
        meds = {}
        for name in SIDES:
            if sides.get(name):
                meds[name] = sides[name]["results"][i]["median"]
                row[name] = meds[name]
        fps = {name: side["results"][i]["ids_fingerprint"] for name, side in sides.items() if side}
        row["ids_fingerprints"] = fps
        row["ids_match"] = len(set(fps.values())) == 1
        for key, other, _ in RATIOS:
            if OURS in meds and other in meds:
                row[key] = {m: ratio(meds[OURS][m], meds[other][m]) for m in common.METRICS}
                a, b = ours["results"][i]["generated_ids"], sides[other]["results"][i]["generated_ids"]
                row["tokens_agree" if other == MLXLM else "tokens_agree_same"] = agreement(a, b)
        if OURS in meds and PUBLIC in meds:
            row["public_over_engine"] = {m: ratio(meds[PUBLIC][m], meds[OURS][m]) for m in common.METRICS}
        row["decode_pct_of_roofline"] = {
            name: (100.0 * m["decode_tok_s"] / roofline if m.get("decode_tok_s") and roofline else None)
            for name, m in meds.items()
        }
        rows.append(row)
    load = {name: {"load_s": s["load_s"], "ready_s": s["ready_s"]} for name, s in sides.items() if s}
    for key, other, _ in RATIOS:
        if ours and sides.get(other):
            load[key] = {k: ratio(ours[k], sides[other][k]) for k in ("load_s", "ready_s")}
    return rows, load


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(report):
    info, bw = report["model"], report["bandwidth"]
    sides = report["engines"]
    names = [n for n in SIDES if sides.get(n)]
    first = sides[names[0]]
    quant = f"{info['quant_bits']}-bit g{info['quant_group']}" if info["quant_bits"] else (info["dtype"] or "dense")
    versions = "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in sides[n]["versions"].items() if k != "python")
                         for n in names if n != PUBLIC)
    dev = first.get("device_info") or {}
    print(f"\nmodel {info['name']}: {info['architecture']}, {info['num_layers']} layers, vocab {info['vocab_size']}, "
          f"{quant}, {'tied' if info['tied_embeddings'] else 'untied'} embeddings")
    print(f"device {first['device']} ({dev.get('device_name', '?')}); {versions}")
    print(f"weights read per decode token {info['weight_bytes_per_token'] / 1e9:.3f} GB; bandwidth "
          f"{bw['gb_s']:.1f} GB/s ({bw['source']}); roofline {fmt(report['roofline_tok_s'], ',.1f')} tok/s")
    ratios = [(key, head) for key, other, head in RATIOS if OURS in names and other in names]
    cols = names + [head for _, head in ratios]
    print()
    print(f"{'prompt':>7} {'metric':<18}" + "".join(f"{c:>14}" for c in cols))
    metrics = [("ttft_s", "TTFT ms", 1e3, ",.1f"), ("prefill_tok_s", "prefill tok/s", 1, ",.1f"),
               ("decode_tok_s", "decode tok/s", 1, ",.1f"), ("roofline", "decode % roofline", 1, ".1f"),
               ("peak_memory_bytes", "peak memory GB", 1e-9, ".3f")]
    for row in report["summary"]:
        for j, (key, label, scale, spec) in enumerate(metrics):
            cells = []
            for n in names:
                v = row["decode_pct_of_roofline"].get(n) if key == "roofline" else row[n][key]
                cells.append(fmt(None if v is None else v * scale, spec))
            for rkey, _ in ratios:
                cells.append(fmt(None if key == "roofline" else row[rkey][key], ".3f"))
            head = f"{row['prompt_tokens']:>7}" if j == 0 else " " * 7
            print(f"{head} {label:<18}" + "".join(f"{c:>14}" for c in cells))
        extra = []
        if not row["ids_match"]:
            extra.append("PROMPT IDS DIFFER BETWEEN SIDES")
        for k, label in (("tokens_agree", "mlx-lm"), ("tokens_agree_same", "same")):
            if k in row:
                t = row[k]
                extra.append(f"greedy tokens equal to {label}: {t['same']}/{t['of']} (common prefix "
                             f"{t['common_prefix']})")
        if extra:
            print(" " * 8 + "; ".join(extra))
    load = report["load"]
    for j, (key, label) in enumerate((("load_s", "load call s"), ("ready_s", "load + 1 token s"))):
        cells = [fmt(load.get(n, {}).get(key), ".3f") for n in names]
        for rkey, _ in ratios:
            cells.append(fmt(load.get(rkey, {}).get(key), ".3f"))
        print(f"{'-' if j == 0 else '':>7} {label:<18}" + "".join(f"{c:>14}" for c in cells))
    if SAME in names:
        same = sides[SAME]
        print(f"\nmlx-lm-same: mlx-lm in {same['model'].get('compute_dtype')} with LD_PRELOAD={same.get('ld_preload')}; "
              "ours/same is the like-for-like ratio.")
    print("\nratios are ours / mlx-lm: above 1 is better for tok/s, below 1 for times and memory.\n"
          "our load is lazy (the first forward pass reads the weights) where mlx-lm's reads them: "
          "compare 'load + 1 token'.")


def git_commit():
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                           timeout=10)
        return (r.stdout.strip() or None) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def warm_page_cache(model_dir):
    """Reads every file of the model directory once (into the OS page cache)."""
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-bin", type=Path, help="the compiled bench example (needed unless --skip-ours)")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--python", default=sys.executable, help="the Python with mlx and mlx-lm (default: this one)")
    p.add_argument("--prompts", default="128,512,2048", type=parse_list)
    p.add_argument("--decode", default=256, type=int)
    p.add_argument("--runs", default=3, type=int)
    p.add_argument("--warmup", default=1, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--rounds", default=1, type=int, help="repeat both sides, alternating their order")
    p.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s (default: measure it)")
    p.add_argument("--bandwidth-size-mb", type=int, default=1024)
    p.add_argument("--bandwidth-json", type=Path, help="a result of bandwidth.py to use instead of measuring")
    p.add_argument("--no-public", action="store_true", help="skip our public-API runs")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-mlxlm", action="store_true")
    p.add_argument("--same-blas", type=Path,
                   help="also run mlx-lm in our compute type with this BLAS library preloaded (like for like)")
    p.add_argument("--json", type=Path, help="the combined report")
    p.add_argument("--raw-dir", type=Path, help="keep each side's JSON of each round here")
    args = p.parse_args()
    if args.decode < 2 or args.runs < 1 or args.rounds < 1 or not args.prompts or min(args.prompts) < 1:
        p.error("--decode must be at least 2; --runs, --rounds and every prompt length at least 1")
    if not args.skip_ours and (args.bench_bin is None or not args.bench_bin.is_file()):
        p.error(f"--bench-bin {args.bench_bin} is not a file (build it: cargo build --release -p mlx-metal "
                f"--example bench)")
    if not (args.model / "config.json").is_file():
        p.error(f"{args.model} has no config.json")

    info = model_info(args.model)
    raw = args.raw_dir or Path(tempfile.mkdtemp(prefix="mlxr-bench-"))
    raw.mkdir(parents=True, exist_ok=True)

    if args.bandwidth:
        bw = {"gb_s": args.bandwidth, "source": "given"}
    elif args.bandwidth_json:
        bw = {**json.loads(args.bandwidth_json.read_text()), "source": "measured"}
    else:
        out = raw / "bandwidth.json"
        run_side([args.python, HERE / "bandwidth.py", "--size-mb", args.bandwidth_size_mb, "--json", out],
                 "bandwidth")
        bw = {**json.loads(out.read_text()), "source": "measured"}
    roofline = bw["gb_s"] * 1e9 / info["weight_bytes_per_token"]

    # Read the model's files once so that both sides load from the page cache: otherwise whichever
    # side runs first pays for the disk, and 'load + 1 token' measures the order, not the engines.
    warm_page_cache(args.model)

    if args.same_blas and not args.same_blas.is_file():
        p.error(f"--same-blas {args.same_blas} is not a file")
    docs = {name: [] for name in SIDES}
    # The like-for-like side needs our compute type, so the first round runs ours first.
    same_dtype = None
    for rnd in range(args.rounds):
        order = [OURS, MLXLM, SAME] if rnd % 2 == 0 else [SAME, MLXLM, OURS]
        for side in order:
            out = raw / f"{side}-round{rnd + 1}.json"
            if side == OURS and not args.skip_ours:
                cmd = [args.bench_bin.resolve(), *side_args(args), "--json", out]
                if args.no_public:
                    cmd.append("--no-public")
                run_side(cmd, f"ours, round {rnd + 1}")
                doc = json.loads(out.read_text())
                docs[OURS].append(doc)
                same_dtype = same_dtype or (doc.get("model") or {}).get("compute_dtype")
                docs[PUBLIC].append(doc.get("public"))
                if doc.get("public") and doc["public"].get("skipped"):
                    print(f"public API skipped: {doc['public']['skipped']}", file=sys.stderr)
            elif side == MLXLM and not args.skip_mlxlm:
                run_side([args.python, HERE / "mlxlm_bench.py", *side_args(args), "--json", out],
                         f"mlx-lm, round {rnd + 1}")
                docs[MLXLM].append(json.loads(out.read_text()))
            elif side == SAME and args.same_blas and not args.skip_mlxlm:
                cmd = [args.python, HERE / "mlxlm_bench.py", *side_args(args), "--json", out]
                if same_dtype in ("float32", "bfloat16", "float16"):
                    cmd += ["--dtype", same_dtype]
                env = {**os.environ, "LD_PRELOAD": str(args.same_blas.resolve())}
                run_side(cmd, f"mlx-lm in {same_dtype or 'its own dtype'} with {args.same_blas}, round {rnd + 1}",
                         env=env)
                docs[SAME].append(json.loads(out.read_text()))

    sides = {name: merge_rounds(d) for name, d in docs.items()}
    sides = {k: v for k, v in sides.items() if v}
    if not sides:
        raise SystemExit("run_all: nothing ran")
    rows, load = summarise(sides, info, roofline)
    report = {
        "schema": common.REPORT_SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                 "cpu_count": os.cpu_count(), "git_commit": git_commit()},
        "command": sys.argv,
        "model": info,
        "bandwidth": bw,
        "roofline_tok_s": roofline,
        "settings": {"prompts": args.prompts, "decode_tokens": args.decode, "runs": args.runs,
                     "warmup": args.warmup, "seed": args.seed, "rounds": args.rounds},
        "summary": rows,
        "load": load,
        "engines": sides,
    }
    sys.stderr.flush()
    print_table(report)
    sys.stdout.flush()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}")
    if not args.raw_dir:
        shutil.rmtree(raw, ignore_errors=True)
    bad = [r["prompt_tokens"] for r in rows if not r["ids_match"]]
    if bad:
        print(f"run_all: the sides fed different prompt ids at {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
