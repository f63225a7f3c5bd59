# SPDX-License-Identifier: EUPL-1.2
"""mlx-lm's side of the batched-step measurement: what one decode step of its BatchGenerator
costs per number of rows, measured as crates/mlx-metal/examples/batch_step.rs measures ours.

    python batch_step.py --model DIR [--rows 1,2,4,8,16,32] [--prompt 128] [--ragged 0]
                         [--decode 64] [--runs 2] [--profile ROWS]

Row i's prompt has prompt - (i * ragged) % prompt tokens (common.prompt_ids, seed i), greedy, no
stop tokens. A step's time is the median gap between row 0's tokens after the first; one line
per row count, the best of --runs (a first run, not counted, compiles the kernels).

--profile ROWS: after the table, one more run at ROWS rows under torch.profiler (CUPTI, in this
process, so it sees MLX's kernels) and the GPU time of its decode steps per kernel name.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_list(s):
    return [int(x) for x in s.split(",") if x.strip()]


def one_run(model, prompts, decode, BatchGenerator):
    gen = BatchGenerator(model, max_tokens=decode, completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    uids = gen.insert(prompts, [decode] * len(prompts))
    first = uids[0]
    times = []
    while responses := gen.next_generated():
        if any(r.uid == first for r in responses):
            times.append(time.perf_counter())
    gen.close()
    gaps = [(b - a) * 1e3 for a, b in zip(times[1:], times[2:])]
    return statistics.median(gaps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=parse_list, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--ragged", type=int, default=0)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--profile", type=int, default=0)
    a = p.parse_args()
    if a.prompt < 1 or a.runs < 1 or a.decode < 3 or not a.rows or min(a.rows) < 1:
        p.error("rows, prompt and runs must be at least 1 and decode at least 3")

    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = load(a.model)
    vocab = model.args.vocab_size if hasattr(model, "args") else len(tokenizer.vocab)

    def prompts_for(rows):
        return [common.prompt_ids(a.prompt - (i * a.ragged) % a.prompt, vocab, i) for i in range(rows)]

    print("| rows | step ms | tok/s | ms per row |")
    print("|---|---|---|---|")
    for rows in a.rows:
        prompts = prompts_for(rows)
        runs = [one_run(model, prompts, a.decode, BatchGenerator) for _ in range(a.runs + 1)][1:]
        best = min(runs)
        print(f"| {rows} | {best:.2f} | {rows * 1e3 / best:.1f} | {best / rows:.2f} |", flush=True)

    if a.profile:
        import torch
        from torch.profiler import ProfilerActivity, profile

        prompts = prompts_for(a.profile)
        one_run(model, prompts, a.decode, BatchGenerator)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            one_run(model, prompts, a.decode, BatchGenerator)
        torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
        print(f"\n{a.profile} rows, {a.decode} tokens (prefill included), GPU time per kernel:\n{table}")


if __name__ == "__main__":
    main()
