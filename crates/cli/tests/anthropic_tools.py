# SPDX-License-Identifier: EUPL-1.2
"""Tool use and stop sequences through the official `anthropic` package against `mlxr serve`.

Run by `tests/serve_tools.rs` with the fixtures virtualenv's Python (`MLXR_PYTHON`):

    python anthropic_tools.py --base-url http://127.0.0.1:PORT --model smollm2-135m-instruct

Prints one `NAME: ok` line per check; exits non-zero with the reason at the first failure.
"""

import argparse
import sys

import anthropic

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def check(condition, message):
    if not condition:
        sys.exit(f"check failed: {message}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    client = anthropic.Anthropic(base_url=args.base_url, api_key="not-needed", max_retries=0, timeout=300)
    model = args.model
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = {"type": "any", "disable_parallel_tool_use": True}

    message = client.messages.create(model=model, max_tokens=60, messages=ask, tools=[WEATHER], tool_choice=forced)
    check(message.stop_reason == "tool_use", f"stop_reason: {message}")
    uses = [b for b in message.content if b.type == "tool_use"]
    check(len(uses) == 1 and uses[0].name == "get_weather", f"content: {message.content}")
    check(isinstance(uses[0].input.get("city"), str) and uses[0].id.startswith("toolu_"), f"tool_use: {uses[0]}")
    print("tool use: ok")

    with client.messages.stream(
        model=model, max_tokens=60, messages=ask, tools=[WEATHER], tool_choice=forced
    ) as stream:
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    check(final.stop_reason == "tool_use", f"streamed stop_reason: {final}")
    check(len(streamed) == 1 and streamed[0].input == uses[0].input, f"streamed {streamed} vs {uses}")
    print("tool use stream: ok")

    history = ask + [
        {"role": "assistant", "content": [b.model_dump() for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "14 C, sunny"}]},
    ]
    after = client.messages.create(model=model, max_tokens=12, messages=history, tools=[WEATHER])
    check(after.stop_reason in ("end_turn", "max_tokens", "tool_use"), f"after the result: {after}")
    print("tool result: ok")

    plain = client.messages.create(model=model, max_tokens=24, messages=[{"role": "user", "content": "Hello there"}])
    words = plain.content[0].text.split()
    check(len(words) >= 3, f"a longer answer to cut: {plain.content[0].text!r}")
    stop = words[2]
    cut = client.messages.create(
        model=model, max_tokens=24, messages=[{"role": "user", "content": "Hello there"}], stop_sequences=[stop]
    )
    check(cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop, f"stop sequence {stop!r}: {cut}")
    check(stop not in cut.content[0].text, f"the stop sequence is left out: {cut.content[0].text!r}")
    print("stop sequence: ok")


if __name__ == "__main__":
    main()
