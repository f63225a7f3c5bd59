# SPDX-License-Identifier: EUPL-1.2
"""The serving benchmark: `mlxr serve` and `mlx_lm.server` on one model, under concurrent streaming load.

    python serve_bench.py --mlxr-bin PATH/mlxr --model DIR [--python PY] [--clients 1,2,4,8,16,32]
                          [--max-tokens 32] [--prompt-words N] [--rounds 2] [--warmup 1]
                          [--ours-args "..."] [--mlxlm-args "..."] [--skip-ours] [--skip-mlxlm]
                          [--json OUT] [--markdown] [--log-dir DIR]

`cargo xtask bench-serve` builds `mlxr` in release and runs this script; nothing here needs cargo,
and it uses the Python standard library only (threads and http.client; the client side is in
serve_load.py beside it), so it runs as it is wherever there is an `mlxr` binary and, for the
mlx-lm side, a Python with mlx-lm.

Each server runs in its own process on a free port of 127.0.0.1, one after the other, never both
at once: ours first (`mlxr serve --port 0`, which prints its address), then mlx-lm's
(`PY -m mlx_lm server --port P`). Once a server answers, --warmup unmeasured requests go through
it, then, for each client count N of --clients and each of --rounds rounds, N threads start
together (a barrier) and each sends one streaming request: POST /v1/chat/completions with one
user message, `stream: true`, `stream_options: {"include_usage": true}`, temperature 0 and
`max_tokens`. Then the server is stopped (SIGTERM, then SIGKILL), and always killed on an error
or Ctrl-C.

Every request of a server's run has its own prompt (request k gets prompt k of a fixed list of
realistic chat questions, optionally lengthened to --prompt-words words), and both servers get the
same list in the same order: no prompt is repeated while the list lasts, so a server's prompt
cache cannot skip a prompt that it has seen before.

Per request: the time to the first chunk with content (TTFT), the tokens generated (the usage
block's completion_tokens when the server sends one, else the count of content chunks; the JSON
says which) and the time of the last chunk (the one carrying finish_reason). Per client count,
over all rounds: the wall time (from the barrier to the last stream's end, summed over rounds),
aggregate tok/s (all tokens / wall), TTFT p50 and p95, the median per-stream tok/s (tokens after
the first / time from the first content chunk to the last chunk) and the errors; then the ratios
ours / mlx-lm, a table on stdout and the JSON (schema "mlxr-serve-bench/1", see
docs/benchmarks.md). The exit status is 1 when any request failed.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import queue
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SCHEMA = "mlxr-serve-bench/1"
OURS, MLXLM = "ours", "mlx-lm"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_load import (HOST, distinct_prompts, finish_record, make_prompt, ratio, run_burst,  # noqa: E402
                        stream_chat, summarise_level)

# --- the servers --------------------------------------------------------------------------------


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def has_flag(args, flag):
    return any(a == flag or a.startswith(flag + "=") for a in args)


class Server:
    """A server process: started, waited for, and always stopped."""

    def __init__(self, name, cmd, log_path, port=None):
        self.name, self.cmd, self.log_path, self.port = name, [str(c) for c in cmd], log_path, port
        self.proc = None
        self.lines = queue.Queue()

    def start(self, timeout):
        print(f"== {self.name}: {shlex.join(self.cmd)}", file=sys.stderr, flush=True)
        self.log = open(self.log_path, "wb")
        started = time.perf_counter()
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop the server.
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = started + timeout
        if self.port is None:
            # mlxr serve --port 0 prints "listening on http://ADDR" once it listens.
            while self.port is None:
                line = self._next_line(deadline)
                if line.startswith("listening on http://"):
                    self.port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
        while not self._healthy():
            if self.proc.poll() is not None:
                self._fail(f"exited with status {self.proc.returncode} before answering")
            if time.perf_counter() > deadline:
                self._fail(f"did not answer within {timeout:.0f} s")
            time.sleep(0.2)
        self.ready_s = time.perf_counter() - started
        print(f"== {self.name}: answering on {HOST}:{self.port} after {self.ready_s:.1f} s", file=sys.stderr,
              flush=True)

    def _read_stdout(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def _next_line(self, deadline):
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            self._fail("printed no address in time")
        if line is None:
            self.proc.wait()
            self._fail(f"exited with status {self.proc.returncode} before listening")
        return line

    def _healthy(self):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def log_tail(self, n=30):
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _fail(self, why):
        self.stop()
        raise SystemExit(f"serve_bench: {self.name} {why}; the end of its log ({self.log_path}):\n{self.log_tail()}")

    def stop(self):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.log.close()


def bench_server(server, args):
    """Starts the server, warms it up, runs every level, stops it; returns its document."""
    texts = {}
    try:
        server.start(args.start_timeout)
        k = 0  # the next prompt: each request of this run gets its own
        for _ in range(args.warmup):
            rec = finish_record(stream_chat(server.port, make_prompt(k, args.prompt_words), args.max_tokens,
                                            args.request_timeout))
            k += 1
            if rec["error"]:
                raise SystemExit(f"serve_bench: {server.name}'s warm-up request failed: {rec['error']}\n"
                                 f"{server.log_tail()}")
        levels = []
        for clients in args.clients:
            rounds = []
            for _ in range(args.rounds):
                idx = list(range(k, k + clients))
                k += clients
                recs, wall = run_burst(server.port, [make_prompt(i, args.prompt_words) for i in idx],
                                       args.max_tokens, args.request_timeout)
                for i, r in zip(idx, recs):
                    r["prompt_index"] = i
                    texts[i] = r.pop("text")
                rounds.append((recs, wall))
            level = summarise_level(clients, rounds)
            levels.append(level)
            print(f"== {server.name}: {clients:>3} clients: {fmt(level['aggregate_tok_s'], '.1f')} tok/s, TTFT p50 "
                  f"{fmt_ms(level['ttft_s']['p50'])} ms, p95 {fmt_ms(level['ttft_s']['p95'])} ms, "
                  f"{level['errors']} errors", file=sys.stderr, flush=True)
            if level["errors"]:
                print(f"   errors: {level['error_messages']}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return {"command": server.cmd, "ready_s": server.ready_s, "prompts_used": k, "levels": levels}, texts


# --- what ran, where ----------------------------------------------------------------------------


def capture(cmd, timeout=120):
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info():
    cpu, memory = platform.processor() or None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError:
        if sys.platform == "darwin":
            cpu = capture(["sysctl", "-n", "machdep.cpu.brand_string"]) or cpu
            mem = capture(["sysctl", "-n", "hw.memsize"])
            memory = int(mem) if mem and mem.isdigit() else None
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "memory_bytes": memory,
            "git_commit": capture(["git", "-C", HERE, "rev-parse", "--short", "HEAD"]),
            "git_dirty": bool(capture(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"])),
            "driver_python": platform.python_version()}


def model_info(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    text = {**config, **(config.get("text_config") or {})}
    quant = config.get("quantization") or {}
    return {"dir": str(model_dir), "name": model_dir.name, "architecture": text.get("model_type"),
            "num_layers": text.get("num_hidden_layers"), "hidden_size": text.get("hidden_size"),
            "vocab_size": text.get("vocab_size"), "dtype": text.get("torch_dtype") or text.get("dtype"),
            "quant_bits": quant.get("bits"), "quant_group": quant.get("group_size")}


MLXLM_VERSIONS = ("import json, platform, mlx.core as mx, mlx_lm; print(json.dumps({'mlx_lm': mlx_lm.__version__, "
                  "'mlx': mx.__version__, 'device': str(mx.default_device()), 'python': platform.python_version()}))")


# --- the report ---------------------------------------------------------------------------------


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_ms(v):
    return fmt(None if v is None else v * 1e3, ",.1f")


METRICS = [
    # (label, getter, spec, scale)
    ("aggregate tok/s", lambda l: l["aggregate_tok_s"], ",.1f", 1),
    ("TTFT p50 ms", lambda l: l["ttft_s"]["p50"], ",.1f", 1e3),
    ("TTFT p95 ms", lambda l: l["ttft_s"]["p95"], ",.1f", 1e3),
    ("per-stream tok/s", lambda l: l["per_stream_tok_s"]["median"], ",.1f", 1),
    ("errors", lambda l: l["errors"], "d", 1),
]


def compare(servers, texts):
    ours, mlx = servers.get(OURS), servers.get(MLXLM)
    if not (ours and mlx):
        return []
    rows = []
    for a, b in zip(ours["levels"], mlx["levels"]):
        prompts = [r["prompt"] for r in a["requests_detail"]]
        same = sum(texts[OURS].get(i) is not None and texts[OURS].get(i) == texts[MLXLM].get(i) for i in prompts)
        rows.append({
            "clients": a["clients"],
            "ratio": {"aggregate_tok_s": ratio(a["aggregate_tok_s"], b["aggregate_tok_s"]),
                      "ttft_p50_s": ratio(a["ttft_s"]["p50"], b["ttft_s"]["p50"]),
                      "ttft_p95_s": ratio(a["ttft_s"]["p95"], b["ttft_s"]["p95"]),
                      "per_stream_tok_s": ratio(a["per_stream_tok_s"]["median"], b["per_stream_tok_s"]["median"])},
            "same_text": {"same": same, "of": len(prompts)},
        })
    return rows


def print_table(report):
    servers = report["servers"]
    names = [n for n in (OURS, MLXLM) if n in servers]
    both = len(names) == 2
    m, s = report["model"], report["settings"]
    print(f"\nmodel {m['name']} ({m['architecture']}, {m['num_layers']} layers, "
          f"{'%s-bit' % m['quant_bits'] if m['quant_bits'] else m['dtype']}); max_tokens {s['max_tokens']}, "
          f"{s['rounds']} round(s) per level, {s['warmup']} warm-up request(s)")
    for n in names:
        print(f"{n}: {servers[n]['version']}; tokens counted from {servers[n]['token_count']}")
    cols = names + (["ours/mlx-lm"] if both else [])
    print()
    print(f"{'clients':>7} {'metric':<17}" + "".join(f"{c:>13}" for c in cols))
    ratios = {r["clients"]: r for r in report["comparison"]}
    ratio_keys = {"aggregate tok/s": "aggregate_tok_s", "TTFT p50 ms": "ttft_p50_s", "TTFT p95 ms": "ttft_p95_s",
                  "per-stream tok/s": "per_stream_tok_s"}
    for i, level in enumerate(servers[names[0]]["levels"]):
        for j, (label, get, spec, scale) in enumerate(METRICS):
            cells = []
            for n in names:
                v = get(servers[n]["levels"][i])
                cells.append(fmt(None if v is None else v * scale, spec))
            if both:
                key = ratio_keys.get(label)
                cells.append(fmt(ratios[level["clients"]]["ratio"][key], ".3f") if key else "")
            head = f"{level['clients']:>7}" if j == 0 else " " * 7
            print(f"{head} {label:<17}" + "".join(f"{c:>13}" for c in cells))
        if both:
            t = ratios[level["clients"]]["same_text"]
            print(" " * 8 + f"same text from both servers: {t['same']}/{t['of']} requests")
    if both:
        print("\nratios are ours / mlx-lm: above 1 is better for tok/s, below 1 for TTFT.")


def print_markdown(report):
    servers = report["servers"]
    names = [n for n in (OURS, MLXLM) if n in servers]
    both = len(names) == 2
    ratios = {r["clients"]: r["ratio"] for r in report["comparison"]}
    head = ["clients"]
    for label in ("aggregate tok/s", "TTFT p50 ms", "TTFT p95 ms", "per-stream tok/s"):
        head += [f"{label} {n}" for n in names] + ([f"{label} ratio"] if both else [])
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    keys = ["aggregate_tok_s", "ttft_p50_s", "ttft_p95_s", "per_stream_tok_s"]
    for i, level in enumerate(servers[names[0]]["levels"]):
        cells = [str(level["clients"])]
        for (label, get, spec, scale), key in zip(METRICS, keys):
            for n in names:
                v = get(servers[n]["levels"][i])
                cells.append(fmt(None if v is None else v * scale, spec))
            if both:
                cells.append(fmt(ratios[level["clients"]][key], ".2f"))
        print("| " + " | ".join(cells) + " |")


# --- main ---------------------------------------------------------------------------------------


def parse_clients(s):
    try:
        items = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of client counts")
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: every client count must be at least 1")
    return items


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlxr-bin", type=Path, help="the mlxr binary (needed unless --skip-ours)")
    p.add_argument("--model", required=True, type=Path, help="the model directory both servers load")
    p.add_argument("--python", default=sys.executable, help="the Python with mlx-lm (default: this one)")
    p.add_argument("--clients", default=[1, 2, 4, 8, 16, 32], type=parse_clients,
                   help="concurrent client counts, comma-separated (default 1,2,4,8,16,32)")
    p.add_argument("--max-tokens", default=32, type=int, help="max_tokens of every request (default 32)")
    p.add_argument("--prompt-words", type=int, help="lengthen each prompt to about this many words")
    p.add_argument("--rounds", default=2, type=int, help="bursts per client count (default 2)")
    p.add_argument("--warmup", default=1, type=int, help="unmeasured requests per server first (default 1)")
    p.add_argument("--ours-args", default="", help="extra flags for `mlxr serve`, one string")
    p.add_argument("--mlxlm-args", default="", help="extra flags for mlx_lm's server, one string")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-mlxlm", action="store_true")
    p.add_argument("--start-timeout", default=300.0, type=float, help="seconds for a server to answer")
    p.add_argument("--request-timeout", default=600.0, type=float, help="socket timeout of a request, seconds")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--markdown", action="store_true", help="also print the figures as a Markdown table")
    p.add_argument("--log-dir", type=Path, help="keep the servers' logs here (default: a temporary folder)")
    args = p.parse_args()
    if args.max_tokens < 2 or args.rounds < 1 or args.warmup < 0:
        p.error("--max-tokens must be at least 2, --rounds at least 1 and --warmup at least 0")
    if args.prompt_words is not None and args.prompt_words < 1:
        p.error("--prompt-words must be at least 1")
    if args.skip_ours and args.skip_mlxlm:
        p.error("--skip-ours and --skip-mlxlm together leave nothing to run")
    if not args.skip_ours and (args.mlxr_bin is None or not args.mlxr_bin.is_file()):
        p.error(f"--mlxr-bin {args.mlxr_bin} is not a file (build it: cargo build --release -p mlxr --bin mlxr)")
    if not (args.model / "config.json").is_file():
        p.error(f"{args.model} has no config.json")
    args.model = args.model.resolve()
    signal.signal(signal.SIGTERM, on_sigterm)
    # Even where SIGINT came ignored (a background job of a script): Ctrl-C must stop the servers.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    needed = args.warmup + args.rounds * sum(args.clients)
    if needed > distinct_prompts():
        print(f"serve_bench: note: {needed} requests but {distinct_prompts()} distinct prompts: some repeat",
              file=sys.stderr)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="mlxr-serve-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    max_clients = max(args.clients)
    servers, texts = {}, {}
    try:
        if not args.skip_ours:
            extra = shlex.split(args.ours_args)
            # Today's engine runs one generation at a time whatever --max-concurrent says (the model's
            # engine thread takes its jobs one after another): these flags only make sure that no
            # request is refused or times out in the queue.
            defaults = []
            if not has_flag(extra, "--max-concurrent"):
                defaults += ["--max-concurrent", str(min(max_clients, 1024))]
            if not has_flag(extra, "--max-queue"):
                defaults += ["--max-queue", str(max(64, 2 * max_clients))]
            cmd = [args.mlxr_bin.resolve(), "serve", "--model", args.model, "--host", HOST, "--port", "0",
                   *defaults, *extra]
            server = Server(OURS, cmd, log_dir / "ours.log")
            version = capture([args.mlxr_bin.resolve(), "--version"])
            info = capture([args.mlxr_bin.resolve(), "info"])
            doc, texts[OURS] = bench_server(server, args)
            servers[OURS] = {"version": version, "info": info, **doc}
        if not args.skip_mlxlm:
            versions = capture([args.python, "-c", MLXLM_VERSIONS])
            port = free_port()
            cmd = [args.python, "-m", "mlx_lm", "server", "--model", args.model, "--host", HOST, "--port", port,
                   *shlex.split(args.mlxlm_args)]
            server = Server(MLXLM, cmd, log_dir / "mlx-lm.log", port=port)
            doc, texts[MLXLM] = bench_server(server, args)
            v = json.loads(versions) if versions else {}
            servers[MLXLM] = {"version": ", ".join(f"{k} {x}" for k, x in v.items()) or None, "info": v, **doc}
    except KeyboardInterrupt:
        print("serve_bench: interrupted; the servers are stopped", file=sys.stderr)
        return 130
    for doc in servers.values():
        sources = {lv["token_count"] for lv in doc["levels"]}
        doc["token_count"] = sources.pop() if len(sources) == 1 else "mixed"
    report = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "host": machine_info(),
        "model": model_info(args.model),
        "settings": {"clients": args.clients, "max_tokens": args.max_tokens, "rounds": args.rounds,
                     "warmup": args.warmup, "prompt_words": args.prompt_words, "temperature": 0,
                     "endpoint": "/v1/chat/completions", "stream": True, "include_usage": True,
                     "distinct_prompts": distinct_prompts(), "ours_args": args.ours_args,
                     "mlxlm_args": args.mlxlm_args},
        "servers": servers,
        "comparison": compare(servers, texts),
    }
    print_table(report)
    if args.markdown:
        print_markdown(report)
    sys.stdout.flush()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}")
    errors = sum(lv["errors"] for doc in servers.values() for lv in doc["levels"])
    if errors:
        print(f"serve_bench: {errors} requests failed (see error_messages in the report)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
