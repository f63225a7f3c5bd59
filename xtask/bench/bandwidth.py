# SPDX-License-Identifier: EUPL-1.2
"""Measures the memory bandwidth MLX reaches on its default device, for the decode roofline.

    python bandwidth.py [--size-mb 1024] [--chain 10] [--trials 5] [--json OUT]

Two measurements over a float32 array of --size-mb:
- copy: a chain of --chain elementwise adds (x = x + 1), each reading and writing the array once,
  all evaluated together: bytes moved = chain x 2 x size;
- read: --chain independent full reductions (sum) of the array: bytes read = chain x size.
Each is the best of --trials (after one warm-up), since the roofline wants what the memory can
do, not an average of interruptions. "gb_s" is the larger of the two: decode reads weights, so
the read figure is the closer model, but an MLX reduction may not saturate the memory where a
copy does. GB are 10^9 bytes.
"""

import argparse
import json
import sys
import time
from pathlib import Path


def best_time(fn, trials):
    fn()
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(size_mb=1024, chain=10, trials=5):
    import mlx.core as mx

    n = size_mb * (1 << 20) // 4
    a = mx.random.uniform(shape=(n,), dtype=mx.float32)
    mx.eval(a)
    size = a.nbytes

    def copy():
        x = a
        for _ in range(chain):
            x = x + 1.0
        mx.eval(x)

    def read():
        mx.eval([mx.sum(a) for _ in range(chain)])

    t_copy = best_time(copy, trials)
    t_read = best_time(read, trials)
    copy_gb_s = chain * 2 * size / t_copy / 1e9
    read_gb_s = chain * size / t_read / 1e9
    del a
    mx.clear_cache()
    return {
        "gb_s": max(copy_gb_s, read_gb_s),
        "copy_gb_s": copy_gb_s,
        "read_gb_s": read_gb_s,
        "array_bytes": size,
        "chain": chain,
        "trials": trials,
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--chain", type=int, default=10)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    r = measure(args.size_mb, args.chain, args.trials)
    print(f"bandwidth on {r['device']}: copy {r['copy_gb_s']:.1f} GB/s, read {r['read_gb_s']:.1f} GB/s",
          file=sys.stderr)
    out = json.dumps(r, indent=2)
    if args.json:
        args.json.write_text(out + "\n")
    else:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
