# SPDX-License-Identifier: EUPL-1.2
"""The official `anthropic` package against `mlxr serve`'s Messages API.

Run by `tests/serve.rs` with the fixtures virtualenv's Python (`MLXR_PYTHON`):

    python anthropic_client.py --base-url http://127.0.0.1:PORT --model qwen3-tiny --key KEY

Prints one `NAME: ok` line per check; exits non-zero with the reason at the first failure.
"""

import argparse
import sys

import anthropic


def check(condition, message):
    if not condition:
        sys.exit(f"check failed: {message}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    client = anthropic.Anthropic(base_url=args.base_url, api_key=args.key, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Hello there"}]

    message = client.messages.create(model=args.model, max_tokens=8, system="Be brief.", messages=messages)
    check(message.type == "message" and message.role == "assistant", f"message: {message}")
    check(len(message.content) == 1 and message.content[0].type == "text", f"content: {message.content}")
    check(message.stop_reason in ("end_turn", "max_tokens"), f"stop_reason: {message.stop_reason}")
    check(message.usage.output_tokens >= 1 and message.usage.input_tokens >= 1, f"usage: {message.usage}")
    print("message: ok")

    with client.messages.stream(model=args.model, max_tokens=8, system="Be brief.", messages=messages) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(streamed == message.content[0].text, f"streamed {streamed!r} vs whole {message.content[0].text!r}")
    check(final.content[0].text == streamed and final.stop_reason == message.stop_reason, f"final: {final}")
    check(final.usage.output_tokens == message.usage.output_tokens, f"final usage: {final.usage}")
    print("stream: ok")

    try:
        client.messages.create(model=args.model, max_tokens=8, messages=[{"role": "system", "content": "x"}])
        check(False, "a bad role was accepted")
    except anthropic.BadRequestError as e:
        check("messages[0].role" in str(e), f"bad role error: {e}")
    print("bad request: ok")

    wrong = anthropic.Anthropic(base_url=args.base_url, api_key="wrong", max_retries=0, timeout=60)
    try:
        wrong.messages.create(model=args.model, max_tokens=8, messages=messages)
        check(False, "a wrong key was accepted")
    except anthropic.AuthenticationError:
        pass
    print("wrong key: ok")


if __name__ == "__main__":
    main()
