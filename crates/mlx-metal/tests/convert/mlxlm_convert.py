# SPDX-License-Identifier: EUPL-1.2
"""The reference for tests/convert.rs: runs mlx-lm's convert() for each job of a JSON list.

Usage: python mlxlm_convert.py JOBS.json

Each job holds convert()'s keyword arguments as `mlx_lm convert` passes them (hf_path, mlx_path,
quantize, q_bits, q_group_size, dtype, quant_predicate), and optionally `max_shard_bytes`: the
largest shard in bytes instead of mlx-lm's 5 GiB, so that small models are cut into shards too.
mlx-lm's own make_shards still cuts them; only the limit it is given changes. One process runs
every job, so mlx-lm is imported once.
"""

import json
import sys
import time

import mlx_lm.utils as utils
from mlx_lm.convert import convert

MAKE_SHARDS = utils.make_shards


class Bytes(int):
    """A limit in bytes where make_shards expects gigabytes (`max_file_size_gb << 30`)."""

    def __lshift__(self, _bits):
        return int(self)


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        limit = job.pop("max_shard_bytes", None)
        if limit is None:
            utils.make_shards = MAKE_SHARDS
        else:
            utils.make_shards = lambda weights, _limit=Bytes(limit): MAKE_SHARDS(weights, _limit)
        start = time.perf_counter()
        convert(**job)
        print(f"[mlxlm_convert] {job['mlx_path']}: {time.perf_counter() - start:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
