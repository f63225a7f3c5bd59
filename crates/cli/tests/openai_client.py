# SPDX-License-Identifier: EUPL-1.2
"""The official `openai` package against `mlxr serve`.

Run by `tests/serve.rs` with the fixtures virtualenv's Python (`MLXR_PYTHON`):

    python openai_client.py --base-url http://127.0.0.1:PORT/v1 --model qwen3-tiny

Prints one `NAME: ok` line per check (and the chat answer as `chat text: <JSON string>`);
exits non-zero with the reason at the first failure.
"""

import argparse
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai


def check(condition, message):
    if not condition:
        sys.exit(f"check failed: {message}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Hello there"}]

    models = client.models.list()
    check([m.id for m in models.data] == [args.model], f"models.list: {models}")

    chat = client.chat.completions.create(model=args.model, messages=messages, max_tokens=12)
    check(chat.object == "chat.completion", f"chat object: {chat.object}")
    text = chat.choices[0].message.content
    check(isinstance(text, str), f"chat content: {chat}")
    check(chat.choices[0].finish_reason in ("stop", "length"), f"finish_reason: {chat}")
    check(chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens >= 1, f"usage: {chat.usage}")
    print("chat: ok")
    print("chat text: " + json.dumps(text, ensure_ascii=False))

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=args.model,
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        check(chunk.object == "chat.completion.chunk", f"chunk object: {chunk.object}")
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    check("".join(pieces) == text, f"streamed {''.join(pieces)!r} but the whole answer was {text!r}")
    check(finish == chat.choices[0].finish_reason, f"stream finish_reason {finish}")
    check(usage is not None and usage.completion_tokens == chat.usage.completion_tokens, f"stream usage {usage}")
    print("chat stream: ok")

    done = client.completions.create(model=args.model, prompt="The quick brown fox", max_tokens=8)
    check(done.object == "text_completion", f"completion object: {done.object}")
    whole = done.choices[0].text
    check(isinstance(whole, str) and done.usage.completion_tokens >= 1, f"completion: {done}")
    print("completions: ok")

    parts = [
        c.choices[0].text
        for c in client.completions.create(model=args.model, prompt="The quick brown fox", max_tokens=8, stream=True)
        if c.choices
    ]
    check("".join(parts) == whole, f"streamed completion {''.join(parts)!r} != {whole!r}")
    print("completions stream: ok")

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(
            pool.map(
                lambda _: client.chat.completions.create(model=args.model, messages=messages, max_tokens=12),
                range(4),
            )
        )
    check(all(a.choices[0].message.content == text for a in answers), "concurrent answers differ")
    print("concurrent: ok")

    stream = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    stream.close()
    health_url = args.base_url.rstrip("/").removesuffix("/v1") + "/health"
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(health_url, timeout=30) as r:
            engine = json.load(r)["engine"]
        if engine["running"] == 0 and engine["cancelled"] >= 1:
            break
        check(time.monotonic() < deadline, f"the closed stream's generation did not stop: {engine}")
        time.sleep(0.05)
    check(engine["cancelled_generation_tokens"] < 4000, f"the generation ran to the end: {engine}")
    print("disconnect: ok")

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        check(False, "an unknown model was accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404 and e.code == "model_not_found", f"unknown model: {e}")
    print("bad model: ok")

    try:
        client.chat.completions.create(model=args.model, messages=messages, max_tokens=2, temperature=-1)
        check(False, "a negative temperature was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.param == "temperature", f"bad setting: {e}")
    print("bad setting: ok")


if __name__ == "__main__":
    main()
