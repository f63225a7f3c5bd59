# SPDX-License-Identifier: EUPL-1.2
"""What both sides of the benchmark share: the prompt tokens, the statistics and the JSON schema.

The Rust side (crates/mlx-metal/examples/bench.rs) implements prompt_ids() and fingerprint() the
same way; the driver checks that both sides report the same fingerprint for every prompt.

Standard library only, so the driver can import it without MLX.
"""

import statistics

SCHEMA = "mlxr-bench/1"
REPORT_SCHEMA = "mlxr-bench-report/1"

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def prompt_ids(n, vocab, seed):
    """n pseudo-random token ids in [0, vocab): SplitMix64 seeded from (seed, n)."""
    state = (seed * GOLDEN + n) & MASK64
    out = []
    for _ in range(n):
        state = (state + GOLDEN) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        out.append(z % vocab)
    return out


def fingerprint(ids):
    """FNV-1a 64 over the ids as little-endian u32, as 16 hex digits."""
    h = 0xCBF29CE484222325
    for i in ids:
        for b in int(i).to_bytes(4, "little"):
            h ^= b
            h = (h * 0x100000001B3) & MASK64
    return f"{h:016x}"


def run_record(prompt_tokens, start, token_times, peak_memory):
    """One measured generation from its timestamps (seconds, same clock).

    ttft_s: from the call until the first generated token is known (the prompt's prefill and the
    first decode step). prefill_tok_s: prompt tokens over ttft_s. decode_tok_s: the tokens after
    the first over the time from the first token to the last, (n - 1) / (t[n-1] - t[0]), so the
    first token's time is not counted twice. peak_memory_bytes: MLX's peak over the call.
    """
    n = len(token_times)
    ttft = token_times[0] - start
    decode = token_times[-1] - token_times[0] if n > 1 else 0.0
    return {
        "ttft_s": ttft,
        "prefill_tok_s": prompt_tokens / ttft if ttft > 0 else None,
        "decode_s": decode,
        "decode_tok_s": (n - 1) / decode if decode > 0 else None,
        "generated_tokens": n,
        "peak_memory_bytes": int(peak_memory),
    }


METRICS = ("ttft_s", "prefill_tok_s", "decode_s", "decode_tok_s", "peak_memory_bytes")


def medians(runs):
    """The median of each metric over runs (None where no run has a value)."""
    out = {}
    for m in METRICS:
        vals = [r[m] for r in runs if r.get(m) is not None]
        out[m] = statistics.median(vals) if vals else None
    if out["peak_memory_bytes"] is not None:
        out["peak_memory_bytes"] = int(out["peak_memory_bytes"])
    return out
