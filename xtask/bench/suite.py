# SPDX-License-Identifier: EUPL-1.2
"""The standard benchmark set: makes the random-weight models of real shapes and runs run_all.py
on each, then writes one Markdown summary for docs/benchmarks.md.

    python suite.py --bench-bin PATH/bench --models-dir DIR --out DIR
                    [--only gemma3-1b-4bit,llama-3.1-8b-4bit] [--small] [-- RUN_ALL_OPTIONS...]

Models (make_model.py presets): gemma3-1b-4bit, gemma3-1b-bf16, llama-3.1-8b-4bit,
qwen3-8b-4bit. A model already in --models-dir with the same recipe is reused. --small makes the
quick test versions instead (2 layers, 6 for Gemma 3; vocabulary 4,096; hidden 256; MLP 768).
Options after `--` go to run_all.py as they are (for example `--runs 5 --bandwidth 4300`); the
bandwidth is measured once (bandwidth.py) and used for every model unless given.

Writes <out>/<model>.json (run_all's report) and <out>/summary.md. Standard library only, plus
whatever the scripts it runs need (mlx, mlx-lm).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODELS = {
    "gemma3-1b-4bit": ("gemma3-1b", 4),
    "gemma3-1b-bf16": ("gemma3-1b", 0),
    "llama-3.1-8b-4bit": ("llama-3.1-8b", 4),
    "qwen3-8b-4bit": ("qwen3-8b", 4),
}
SMALL = ["--vocab", "4096", "--set", "hidden_size=256", "--set", "intermediate_size=768"]


def run(cmd):
    cmd = [str(c) for c in cmd]
    print("==", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise SystemExit(f"suite: {cmd[1] if len(cmd) > 1 else cmd[0]} failed with exit status {r.returncode}")


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def pair(row, key, scale, spec):
    a = row.get("ours", {}).get(key)
    b = row.get("mlx-lm", {}).get(key)
    r = row.get("ratio", {}).get(key)
    return (f"{fmt(None if a is None else a * scale, spec)} / {fmt(None if b is None else b * scale, spec)}"
            f" ({fmt(r, '.2f')})")


def summary_md(reports):
    lines = []
    first = next(iter(reports.values()))
    eng = first["engines"]
    some = eng.get("ours") or eng.get("mlx-lm")
    dev = some.get("device_info") or {}
    versions = {k: v for s in eng.values() for k, v in s["versions"].items() if k != "python"}
    bw = first["bandwidth"]
    s = first["settings"]
    lines.append(f"Date {first['date']}, host {first['host']['hostname']}, device {some['device']} "
                 f"({dev.get('device_name', '?')}), " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
                 + f", commit {first['host'].get('git_commit') or '?'}.")
    lines.append(f"Bandwidth {bw['gb_s']:.0f} GB/s ({bw['source']}"
                 + (f": copy {bw['copy_gb_s']:.0f}, read {bw['read_gb_s']:.0f}" if "copy_gb_s" in bw else "")
                 + f"). Decode {s['decode_tokens']} tokens, EOS ignored; median of {s['runs']} runs x "
                 f"{s['rounds']} round(s) after {s['warmup']} warm-up run(s).")
    lines.append("")
    lines.append("Cells are ours / mlx-lm (ratio ours/mlx-lm).")
    lines.append("")
    lines.append("| model | prompt | TTFT ms | prefill tok/s | decode tok/s | decode % roofline | peak GB "
                 "| public API decode tok/s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, rep in reports.items():
        for row in rep["summary"]:
            pct = row["decode_pct_of_roofline"]
            pub = row.get("ours-public", {}).get("decode_tok_s")
            lines.append(
                f"| {name} | {row['prompt_tokens']} | {pair(row, 'ttft_s', 1e3, ',.1f')} "
                f"| {pair(row, 'prefill_tok_s', 1, ',.0f')} | {pair(row, 'decode_tok_s', 1, ',.1f')} "
                f"| {fmt(pct.get('ours'), '.1f')} / {fmt(pct.get('mlx-lm'), '.1f')} "
                f"| {pair(row, 'peak_memory_bytes', 1e-9, '.2f')} | {fmt(pub, ',.1f')} |")
    lines.append("")
    lines.append("| model | weights GB | read per token GB | roofline tok/s | load call s ours / mlx-lm "
                 "| load + 1 token s ours / mlx-lm |")
    lines.append("|---|---|---|---|---|---|")
    for name, rep in reports.items():
        m, ld = rep["model"], rep["load"]
        o, x = ld.get("ours", {}), ld.get("mlx-lm", {})
        lines.append(f"| {name} | {m['weight_bytes_total'] / 1e9:.3f} | {m['weight_bytes_per_token'] / 1e9:.3f} "
                     f"| {fmt(rep['roofline_tok_s'], ',.0f')} | {fmt(o.get('load_s'), '.2f')} / "
                     f"{fmt(x.get('load_s'), '.2f')} | {fmt(o.get('ready_s'), '.2f')} / {fmt(x.get('ready_s'), '.2f')} |")
    return "\n".join(lines) + "\n"


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-bin", required=True, type=Path)
    p.add_argument("--models-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--only", help="comma-separated model names (default: all)")
    p.add_argument("--small", action="store_true", help="the quick test versions of the models")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)

    if "--bandwidth" not in extra:
        bw_json = args.out / "bandwidth.json"
        run([args.python, HERE / "bandwidth.py", "--json", bw_json])
        extra += ["--bandwidth-json", bw_json]

    reports = {}
    for name in names:
        preset, bits = MODELS[name]
        model_dir = args.models_dir / (f"small-{name}" if args.small else name)
        make = [args.python, HERE / "make_model.py", "--preset", preset, "--bits", bits, "--out", model_dir]
        if args.small:
            make += ["--layers", "6" if preset.startswith("gemma3") else "2", *SMALL]
        run(make)
        out = args.out / f"{name}.json"
        run([args.python, HERE / "run_all.py", "--bench-bin", args.bench_bin, "--model", model_dir,
             "--python", args.python, "--json", out, *extra])
        reports[name] = json.loads(out.read_text())
        # Written after every model, so a run cut short still leaves a summary.
        (args.out / "summary.md").write_text(summary_md(reports))
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
