# SPDX-License-Identifier: EUPL-1.2
"""Speculative decoding against plain decoding, ours and mlx-lm's, on one machine in one run.

    python spec_bench.py --mlxr-bin target/release/mlxr --model DIR --python VENV_PYTHON
                         [--draft DIR] [--max-tokens 128] [--runs 2] [--lookup-tokens 4,8]
                         [--same-blas LIB] [--mlxr-flag=--quantised --mlxr-flag=keep ...] [--json OUT] [--markdown]

Two chat prompts whose answers repeat their input (an edit of a piece of code, a summary that
quotes its text) go through the chat template, greedy, EOS ending them. Our side is `mlxr generate
--chat --metrics` plain, with `--prompt-lookup` (each of --lookup-tokens as --num-draft-tokens)
and with `--draft-model` when --draft is given; its decode rate is the one --metrics prints
(generated tokens over the time from the first token to the last, as mlx-lm's
`generation_tps`), the load left out. mlx-lm's side is `mlx_lm.stream_generate` plain and with
`draft_model` (mlx-lm has no prompt lookup) in the checkpoint's own type on the BLAS its wheel
links ("mlx-lm"), and, with --same-blas, in float32 with that library preloaded ("mlx-lm-same":
the compute type and BLAS our side runs on here). Medians of --runs after one warm-up run each.
Every speculative answer is checked against the plain one of its side (greedy output must be
equal) and the check is reported.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

CODE = '''def summarise(orders):
    total = 0
    count = 0
    largest = None
    for order in orders:
        if order.get("cancelled"):
            continue
        amount = order["quantity"] * order["price"]
        total += amount
        count += 1
        if largest is None or amount > largest:
            largest = amount
    average = total / count if count else 0
    return {"total": total, "count": count, "average": average, "largest": largest}
'''

TEXT = ("The river Severn is the longest river in Great Britain, at about 220 miles. It rises in the "
        "Cambrian Mountains in mid Wales, flows through Shrewsbury, Worcester and Gloucester, and "
        "reaches the sea in the Bristol Channel. Its estuary has one of the largest tidal ranges in the "
        "world, and a tidal bore, the Severn bore, runs up the river on the highest tides. The river "
        "has been crossed by two motorway bridges since 1966 and 1996, and a railway tunnel under the "
        "estuary opened in 1886.")

PROMPTS = {
    "edit": "Rename the variable `total` to `revenue` in this Python function. Reply with the whole "
            "function and nothing else.\n\n" + CODE,
    "summarise": "Summarise this text in three sentences, keeping its own words where you can:\n\n" + TEXT,
}

MLXLM = r'''
import json, sys, time
import mlx.core as mx
from mlx_lm import load, stream_generate
args = json.loads(sys.argv[1])
model, tok = load(args["model"])
draft = load(args["draft"])[0] if args.get("draft") else None
if args.get("dtype"):
    model.set_dtype(getattr(mx, args["dtype"]))
    if draft is not None:
        draft.set_dtype(getattr(mx, args["dtype"]))
prompt = tok.apply_chat_template([{"role": "user", "content": args["prompt"]}], add_generation_prompt=True)
out = []
for run in range(args["runs"] + 1):
    text, last, acc = "", None, 0
    kw = {"draft_model": draft, "num_draft_tokens": args["k"]} if draft is not None else {}
    for r in stream_generate(model, tok, prompt, max_tokens=args["max_tokens"], **kw):
        text += r.text
        last = r
        acc += int(bool(getattr(r, "from_draft", False)))
    if run:
        out.append({"tps": last.generation_tps, "tokens": last.generation_tokens, "text": text, "accepted": acc})
print(json.dumps(out))
'''


def ours(args, prompt, extra):
    cmd = [str(args.mlxr_bin), "generate", "--model", str(args.model), "--chat", "--metrics",
           "--max-tokens", str(args.max_tokens), *args.mlxr_flag, *extra, prompt]
    runs = []
    for run in range(args.runs + 1):
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd[:-1])} failed:\n{p.stderr}")
        line = next((l for l in p.stderr.splitlines() if "generation:" in l), "")
        m = re.search(r"generation: (\d+) tokens, ([\d.]+) tokens/s", line)
        if not m:
            sys.exit(f"no metrics line in:\n{p.stderr}")
        s = re.search(r"speculative: (\d+) of (\d+) guesses accepted", line)
        if run:
            runs.append({"tps": float(m.group(2)), "tokens": int(m.group(1)), "text": p.stdout,
                         "accepted": int(s.group(1)) if s else 0, "drafted": int(s.group(2)) if s else 0})
    return runs


def mlxlm(args, prompt, draft, k, dtype=None, preload=None):
    spec = {"model": str(args.model), "draft": str(draft) if draft else None, "k": k, "prompt": prompt,
            "max_tokens": args.max_tokens, "runs": args.runs, "dtype": dtype}
    env = dict(os.environ)
    if preload:
        env["LD_PRELOAD"] = str(preload)
    p = subprocess.run([str(args.python), "-c", MLXLM, json.dumps(spec)], capture_output=True, text=True,
                       env=env, check=False)
    if p.returncode != 0:
        sys.exit(f"mlx-lm failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summary(runs, plain):
    tps = statistics.median(r["tps"] for r in runs)
    out = {"tok_s": tps, "tokens": runs[0]["tokens"], "same_as_plain": all(r["text"] == plain[0]["text"] for r in runs)}
    drafted = sum(r.get("drafted", 0) for r in runs)
    if drafted:
        out["acceptance"] = sum(r["accepted"] for r in runs) / drafted
    elif any(r.get("accepted") for r in runs):
        out["accepted_per_run"] = statistics.median(r["accepted"] for r in runs)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlxr-bin", required=True, type=Path)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--python", required=True, type=Path)
    p.add_argument("--draft", type=Path)
    p.add_argument("--draft-tokens", default=3, type=int)
    p.add_argument("--lookup-tokens", default="4,8")
    p.add_argument("--max-tokens", default=128, type=int)
    p.add_argument("--runs", default=2, type=int)
    p.add_argument("--same-blas", type=Path)
    p.add_argument("--mlxr-flag", action="append", default=[], help="an extra flag for mlxr generate")
    p.add_argument("--skip-mlxlm", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    report = {"model": args.model.name, "draft": args.draft.name if args.draft else None,
              "max_tokens": args.max_tokens, "runs": args.runs, "prompts": {}}
    for name, prompt in PROMPTS.items():
        rows = {}
        plain = ours(args, prompt, [])
        rows["ours plain"] = summary(plain, plain)
        for k in [int(x) for x in args.lookup_tokens.split(",") if x]:
            rows[f"ours prompt lookup, {k}"] = summary(ours(args, prompt, ["--prompt-lookup", "--num-draft-tokens", str(k)]), plain)
        if args.draft:
            extra = ["--draft-model", str(args.draft), "--num-draft-tokens", str(args.draft_tokens)]
            rows[f"ours draft {args.draft.name}, {args.draft_tokens}"] = summary(ours(args, prompt, extra), plain)
        sides = [] if args.skip_mlxlm else [("mlx-lm", None, None)]
        if args.same_blas and not args.skip_mlxlm:
            sides.append(("mlx-lm-same", "float32", args.same_blas))
        for side, dtype, preload in sides:
            base = mlxlm(args, prompt, None, 0, dtype, preload)
            rows[f"{side} plain"] = summary(base, base)
            if args.draft:
                runs = mlxlm(args, prompt, args.draft, args.draft_tokens, dtype, preload)
                rows[f"{side} draft {args.draft.name}, {args.draft_tokens}"] = summary(runs, base)
        report["prompts"][name] = rows
        print(f"{name}: " + json.dumps(rows), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        print("| prompt | side | tokens | decode tok/s | vs its plain | acceptance | same text as plain |")
        print("|---|---|---:|---:|---:|---:|---|")
        for name, rows in report["prompts"].items():
            for side, r in rows.items():
                base = rows[("ours" if side.startswith("ours") else side.split(" ")[0]) + " plain"]
                acc = f"{r['acceptance'] * 100:.0f}%" if "acceptance" in r else (
                    f"{r['accepted_per_run']:.0f} tokens" if "accepted_per_run" in r else "")
                print(f"| {name} | {side} | {r['tokens']} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}× "
                      f"| {acc} | {'yes' if r['same_as_plain'] else 'no'} |")


if __name__ == "__main__":
    main()
