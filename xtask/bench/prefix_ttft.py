# SPDX-License-Identifier: EUPL-1.2
"""The prompt cache's effect on time to first token: a long shared prefix, asked twice.

  prefix_ttft.py --port P [--prefix-words 1500] [--max-tokens 8]

Against a running server (ours or mlx_lm.server), sends two streaming chat completions whose user messages share
a long first part (about 2,000 tokens with the default --prefix-words) and differ in the question at the end, one
after the other, and prints each one's time to first token, prompt and cached token counts, and the ratio
second / first as JSON. The first request prefills everything; with a prompt cache the second prefills only the
question.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import stream_chat  # noqa: E402

WORDS = ("river mountain valley harbour forest meadow island canyon glacier desert prairie lagoon delta "
         "plateau estuary fjord marsh tundra savanna reef").split()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix-words", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    prefix = "Here are notes on geography: " + " ".join(WORDS[i % len(WORDS)] for i in range(args.prefix_words))
    out = []
    for question in ("Which of these is coldest?", "Which of these is wettest?"):
        rec = stream_chat(args.port, f"{prefix}\n\n{question}", args.max_tokens, timeout=900)
        if rec["error"]:
            raise SystemExit(f"prefix_ttft: {rec['error']}")
        out.append({"ttft_s": rec["ttft_s"], "prompt_tokens": rec["prompt_tokens"],
                    "cached_tokens": rec["cached_tokens"]})
    print(json.dumps({"first": out[0], "second": out[1], "ttft_ratio": out[1]["ttft_s"] / out[0]["ttft_s"]}))


if __name__ == "__main__":
    main()
