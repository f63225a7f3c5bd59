# SPDX-License-Identifier: EUPL-1.2
"""Tool calls and structured output through the official `openai` package against `mlxr serve`.

Run by `tests/serve_tools.rs` with the fixtures virtualenv's Python (`MLXR_PYTHON`):

    python openai_tools.py --base-url http://127.0.0.1:PORT/v1 --model smollm2-135m-instruct

Prints one `NAME: ok` line per check; exits non-zero with the reason at the first failure.
"""

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import openai

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "bright": {"type": "boolean"}},
        "required": ["colour", "bright"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["tags"],
    },
]


def check(condition, message):
    if not condition:
        sys.exit(f"check failed: {message}")


def valid(value, schema):
    """Whether `value` is valid against `schema` (the keywords used here)."""
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict) or any(k not in value for k in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False and any(k not in props for k in value):
            return False
        return all(valid(v, props[k]) for k, v in value.items() if k in props)
    if kind == "array":
        return (
            isinstance(value, list)
            and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
            and all(valid(v, schema.get("items", {})) for v in value)
        )
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and schema.get("minimum", value) <= value <= schema.get("maximum", value)
        )
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    return True


def check_call(call, tools):
    tool = next((t for t in tools if t["function"]["name"] == call.function.name), None)
    check(tool is not None, f"a call of an unknown function: {call}")
    check(call.type == "function" and call.id.startswith("call_"), f"call shape: {call}")
    args = json.loads(call.function.arguments)
    check(valid(args, tool["function"]["parameters"]), f"arguments {args} against {tool}")
    return call.function.name, args


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0, timeout=300)
    model = args.model
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [WEATHER, CLOCK]

    forced = client.chat.completions.create(
        model=model, messages=ask, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=60
    )
    choice = forced.choices[0]
    check(choice.finish_reason == "tool_calls", f"finish_reason: {choice}")
    check(len(choice.message.tool_calls) == 1, f"one call: {choice.message}")
    whole = check_call(choice.message.tool_calls[0], tools)
    print("required: ok")

    calls, finish = {}, None
    for chunk in client.chat.completions.create(
        model=model,
        messages=ask,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        stream=True,
    ):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = d.id or entry["id"]
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    check(finish == "tool_calls" and list(calls) == [0], f"streamed calls {calls}, finish {finish}")
    streamed = (calls[0]["name"], json.loads(calls[0]["arguments"]))
    check(streamed == whole, f"streamed {streamed} but the whole answer called {whole}")
    print("required stream: ok")

    named = client.chat.completions.create(
        model=model,
        messages=ask,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
        temperature=1.0,
        seed=5,
    )
    name, _ = check_call(named.choices[0].message.tool_calls[0], tools)
    check(name == "get_time", f"named choice: {named.choices[0].message}")
    print("named: ok")

    call = choice.message.tool_calls[0]
    history = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 14})},
    ]
    after = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=16)
    check(after.choices[0].finish_reason in ("stop", "length", "tool_calls"), f"after the result: {after}")
    print("tool result: ok")

    def structured(i):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Answer in JSON."}],
            response_format=fmt,
            max_tokens=80,
            temperature=0.8,
            seed=i,
        )

    with ThreadPoolExecutor(max_workers=len(SCHEMAS)) as pool:
        answers = list(pool.map(structured, range(len(SCHEMAS))))
    for schema, answer in zip(SCHEMAS, answers):
        text = answer.choices[0].message.content
        check(answer.choices[0].finish_reason == "stop", f"the JSON was cut off: {text!r}")
        check(valid(json.loads(text), schema), f"{text!r} against {schema}")
    print("json_schema: ok")

    obj = client.chat.completions.create(
        model=model, messages=ask, response_format={"type": "json_object"}, max_tokens=80, temperature=0.8, seed=2
    )
    text = obj.choices[0].message.content
    check(obj.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict), f"json_object: {text!r}")
    print("json_object: ok")

    try:
        client.chat.completions.create(model=model, messages=ask, tool_choice="required", max_tokens=2)
        check(False, "tool_choice required without tools was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.param == "tool_choice", f"required without tools: {e}")
    try:
        client.chat.completions.create(
            model=model,
            messages=ask,
            max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )
        check(False, "a schema that does not compile was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "nonsense" in str(e), f"bad schema: {e}")
    print("errors: ok")


if __name__ == "__main__":
    main()
