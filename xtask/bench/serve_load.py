# SPDX-License-Identifier: EUPL-1.2
"""The client side of the serving benchmark (serve_bench.py): the prompts, one timed streaming request,
a burst of concurrent clients and the figures of a client count.

Standard library only: threads and http.client.
"""

import http.client
import json
import statistics
import threading
import time

HOST = "127.0.0.1"

# --- prompts ------------------------------------------------------------------------------------

# Questions of the kind people send to a chat model; combined with SUBJECTS they give
# len(TASKS) * len(SUBJECTS) distinct prompts.
TASKS = [
    "Explain {} to a curious twelve-year-old in a few sentences.",
    "What are the three most common misconceptions about {}?",
    "Write a short, friendly paragraph introducing {} to a beginner.",
    "Give me a step-by-step plan for learning the basics of {} in a month.",
    "Summarise the history of {} in five bullet points.",
    "What questions should I ask an expert in {} at a dinner party?",
    "Compare {} with a closely related topic and say how they differ.",
    "Describe a typical day for someone whose job revolves around {}.",
    "List some good books or resources for getting started with {}.",
    "Why does {} matter in everyday life? Give two concrete examples.",
    "Write a haiku about {} and then explain the imagery you chose.",
    "What are the main open problems or debates in {} today?",
    "Draft a short email inviting colleagues to a lunchtime talk on {}.",
    "How would you explain {} using an analogy from cooking?",
    "What safety or ethical concerns come up around {}?",
    "Suggest a weekend project that would teach me something about {}.",
]
SUBJECTS = [
    "photosynthesis", "the stock market", "black holes", "sourdough baking", "the immune system",
    "machine learning", "the French Revolution", "plate tectonics", "jazz improvisation",
    "beekeeping", "climate change", "the printing press", "vaccines", "chess openings",
    "renewable energy", "the Roman Empire", "quantum computing", "urban gardening",
    "the water cycle", "public key cryptography", "marathon training", "coral reefs",
    "inflation", "the human brain", "volcanoes", "container shipping", "origami",
    "the Silk Road", "electric cars", "bird migration", "compound interest", "opera",
    "antibiotic resistance", "the Moon landings", "coffee roasting", "glaciers",
]
# Background text that --prompt-words draws on to lengthen a prompt.
PASSAGE = (
    "The committee met on a rainy Tuesday to review the quarterly figures and the plans for the new "
    "community library. Attendance at the evening classes had grown steadily, especially the language "
    "courses and the workshops on repairing bicycles and small household appliances. Several members "
    "asked whether the budget could stretch to longer opening hours at weekends, when families are most "
    "likely to visit. The treasurer noted that heating costs had risen sharply over the winter and that "
    "the roof above the reading room still leaked during heavy storms. A local builder had offered to "
    "inspect it free of charge. Volunteers described the success of the summer reading challenge, in "
    "which more than three hundred children had taken part, and proposed a similar scheme for adults. "
    "The meeting closed with a vote to publish the minutes online and to invite residents to a consultation."
).split()


def make_prompt(k, words=None):
    """Request k's user message: a distinct question, lengthened to about `words` words when given."""
    n = len(TASKS) * len(SUBJECTS)
    k %= n
    # Walk the subjects first so that neighbouring requests differ in both task and subject.
    question = TASKS[(k + k // len(SUBJECTS)) % len(TASKS)].format(SUBJECTS[k % len(SUBJECTS)])
    if not words:
        return question
    extra = words - len(question.split()) - 2
    if extra <= 0:
        return question
    start = (k * 37) % len(PASSAGE)
    filler = [PASSAGE[(start + i) % len(PASSAGE)] for i in range(extra)]
    return "My notes: " + " ".join(filler).rstrip(".") + ". " + question


def distinct_prompts():
    return len(TASKS) * len(SUBJECTS)


# --- statistics ---------------------------------------------------------------------------------


def percentile(values, p):
    """The p-th percentile (0..100) by linear interpolation between the closest ranks; None if empty."""
    if not values:
        return None
    s = sorted(values)
    x = (len(s) - 1) * p / 100.0
    lo = int(x)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (x - lo)


def ratio(a, b):
    return a / b if a is not None and b else None


# --- one streaming request ----------------------------------------------------------------------


def stream_chat(port, prompt, max_tokens, timeout):
    """One streaming chat completion; returns its record (timestamps are seconds from its start)."""
    body = json.dumps({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    rec = {"ttft_s": None, "end_s": None, "chunks": 0, "usage_tokens": None, "prompt_tokens": None,
           "cached_tokens": None, "finish_reason": None, "text": "", "error": None}
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    start = time.perf_counter()
    rec["start"] = start
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {resp.read(500).decode('utf-8', 'replace').strip()}"
            return rec
        done = False
        text = []
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            now = time.perf_counter() - start
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                rec["error"] = f"error event: {json.dumps(chunk['error'])[:300]}"
                return rec
            usage = chunk.get("usage")
            if usage:
                rec["usage_tokens"] = usage.get("completion_tokens")
                rec["prompt_tokens"] = usage.get("prompt_tokens")
                rec["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    rec["chunks"] += 1
                    text.append(content)
                    if rec["ttft_s"] is None:
                        rec["ttft_s"] = now
                    rec["end_s"] = now
                if choice.get("finish_reason"):
                    rec["finish_reason"] = choice["finish_reason"]
                    rec["end_s"] = now
        rec["text"] = "".join(text)
        if not done:
            rec["error"] = "the stream ended without data: [DONE]"
        elif rec["ttft_s"] is None:
            rec["error"] = "no content in the stream"
    except (OSError, http.client.HTTPException, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return rec


def finish_record(rec):
    """Adds tokens, their source and the per-stream speed to a request's record."""
    if rec["usage_tokens"] is not None:
        rec["tokens"], rec["count_source"] = rec["usage_tokens"], "usage"
    else:
        rec["tokens"], rec["count_source"] = rec["chunks"], "chunks"
    decode = (rec["end_s"] - rec["ttft_s"]) if rec["ttft_s"] is not None and rec["end_s"] is not None else 0
    rec["stream_tok_s"] = (rec["tokens"] - 1) / decode if rec["tokens"] > 1 and decode > 0 else None
    return rec


# --- running a server through every level -------------------------------------------------------


def run_burst(port, prompts, max_tokens, timeout):
    """One round of len(prompts) clients started together; returns (records, wall seconds)."""
    n = len(prompts)
    barrier = threading.Barrier(n + 1)
    records = [None] * n

    def client(i):
        barrier.wait()
        records[i] = finish_record(stream_chat(port, prompts[i], max_tokens, timeout))
        records[i]["done"] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = max(r["done"] for r in records) - t0
    for r in records:
        r["start_offset_s"] = r.pop("start") - t0
        del r["done"]
    return records, wall


def summarise_level(clients, rounds):
    """A client count's figures over its rounds: [(records, wall), ...]."""
    records = [r for recs, _ in rounds for r in recs]
    ok = [r for r in records if r["error"] is None]
    wall = sum(w for _, w in rounds)
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft_s"] for r in ok]
    speeds = [r["stream_tok_s"] for r in ok if r["stream_tok_s"] is not None]
    sources = sorted({r["count_source"] for r in ok})
    return {
        "clients": clients,
        "rounds": len(rounds),
        "requests": len(records),
        "errors": len(records) - len(ok),
        "error_messages": sorted({r["error"] for r in records if r["error"]})[:5],
        "wall_s": wall,
        "round_wall_s": [w for _, w in rounds],
        "tokens": tokens,
        "token_count": sources[0] if len(sources) == 1 else ("mixed" if sources else None),
        "aggregate_tok_s": tokens / wall if wall > 0 and ok else None,
        "ttft_s": {"p50": percentile(ttfts, 50), "p95": percentile(ttfts, 95),
                   "min": min(ttfts, default=None), "max": max(ttfts, default=None)},
        "per_stream_tok_s": {"median": statistics.median(speeds) if speeds else None,
                             "min": min(speeds, default=None), "max": max(speeds, default=None)},
        "requests_detail": [
            {"round": j, "prompt": r["prompt_index"], "start_offset_s": r["start_offset_s"], "ttft_s": r["ttft_s"],
             "end_s": r["end_s"], "tokens": r["tokens"], "count_source": r["count_source"],
             "content_chunks": r["chunks"], "prompt_tokens": r["prompt_tokens"],
             "cached_tokens": r["cached_tokens"], "stream_tok_s": r["stream_tok_s"],
             "finish_reason": r["finish_reason"], "error": r["error"]}
            for j, (recs, _) in enumerate(rounds) for r in recs
        ],
    }
