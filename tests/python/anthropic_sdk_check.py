"""Drives a running onnx-chat server with the official Anthropic Python SDK, unchanged.

usage: python anthropic_sdk_check.py BASE_URL MODEL
Prints one JSON object with what the SDK saw; the Rust test (tests/anthropic_sdk.rs) checks it.
"""
import json
import sys

import anthropic
from anthropic import Anthropic

base, model = sys.argv[1], sys.argv[2]
client = Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=60)
messages = [{"role": "user", "content": "Write a haiku about the sea."}]
# The SDK has no sampling parameters any more; the API still takes them (extra_body).
GREEDY, SAMPLED = {"temperature": 0}, {"temperature": 1, "seed": 3}
out = {"sdk_version": anthropic.__version__}

r = client.messages.create(model=model, max_tokens=32, extra_body=GREEDY, messages=messages)
out["create"] = {
    "type": r.type, "role": r.role, "model": r.model, "id": r.id,
    "blocks": [b.type for b in r.content],
    "text": "".join(b.text for b in r.content if b.type == "text"),
    "stop_reason": r.stop_reason, "stop_sequence": r.stop_sequence,
    "usage": r.usage.model_dump(),
}

# The stream helper: its event accumulator rebuilds the message.
with client.messages.stream(model=model, max_tokens=32, extra_body=GREEDY, messages=messages) as s:
    events = [e.type for e in s]
    final = s.get_final_message()
out["stream"] = {
    "events": events,
    "text": "".join(b.text for b in final.content if b.type == "text"),
    "stop_reason": final.stop_reason,
    "usage": final.usage.model_dump(),
}

# A stop sequence (two characters of the answer above), and a system prompt.
stop = out["create"]["text"][2:4]
r = client.messages.create(model=model, max_tokens=32, extra_body=GREEDY, messages=messages,
                           stop_sequences=["never said", stop])
out["stopped"] = {"text": "".join(b.text for b in r.content if b.type == "text"),
                  "stop_reason": r.stop_reason, "stop_sequence": r.stop_sequence, "asked": stop}
r = client.messages.create(model=model, max_tokens=4, extra_body=GREEDY, messages=messages,
                           system=[{"type": "text", "text": "Be brief."}])
out["system_input_tokens"] = r.usage.input_tokens + r.usage.cache_read_input_tokens

# Structured output (output_config.format): the answer is JSON that follows the schema.
schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
          "required": ["answer"], "additionalProperties": False}
r = client.messages.create(model=model, max_tokens=60, messages=messages, extra_body=SAMPLED,
                           output_config={"format": {"type": "json_schema", "schema": schema}})
out["structured"] = {"text": "".join(b.text for b in r.content if b.type == "text"), "stop_reason": r.stop_reason}

out["count_tokens"] = client.messages.count_tokens(model=model, messages=messages).input_tokens

# Tools: a forced call, its result sent back, then an answer.
tools = [{"name": "get_weather", "description": "Current weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                           "required": ["city"], "additionalProperties": False}}]
ask = [{"role": "user", "content": "Weather in Paris?"}]
r = client.messages.create(model=model, max_tokens=200, extra_body=SAMPLED, messages=ask, tools=tools,
                           tool_choice={"type": "tool", "name": "get_weather"})
uses = [b for b in r.content if b.type == "tool_use"]
out["tool"] = {"stop_reason": r.stop_reason, "calls": [{"id": u.id, "name": u.name, "input": u.input} for u in uses]}
follow = ask + [{"role": "assistant", "content": [b.model_dump() for b in r.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                              "content": "21 degrees"}]}]
r = client.messages.create(model=model, max_tokens=8, extra_body=GREEDY, messages=follow, tools=tools)
out["tool_result"] = {"stop_reason": r.stop_reason, "input_tokens": r.usage.input_tokens,
                      "cached": r.usage.cache_read_input_tokens}
# Streamed, the call arrives as a tool_use block with input_json_delta.
with client.messages.stream(model=model, max_tokens=400, extra_body=SAMPLED, messages=ask, tools=tools,
                            tool_choice={"type": "any", "disable_parallel_tool_use": True}) as s:
    final = s.get_final_message()
out["tool_stream"] = {"stop_reason": final.stop_reason,
                      "calls": [{"name": b.name, "input": b.input} for b in final.content if b.type == "tool_use"]}

# Errors arrive as the SDK's typed exceptions.
errors = {}
for name, call in [
    ("bad_temperature", lambda: client.messages.create(model=model, max_tokens=8, messages=messages,
                                                       extra_body={"temperature": 3})),
    ("unknown_model", lambda: client.messages.create(model="nope", max_tokens=8, messages=messages)),
    ("empty_messages", lambda: client.messages.create(model=model, max_tokens=8, messages=[])),
    ("server_tool", lambda: client.messages.create(model=model, max_tokens=8, messages=messages,
                                                   tools=[{"type": "web_search_20250305", "name": "web_search"}])),
]:
    try:
        call()
        errors[name] = None
    except anthropic.APIStatusError as e:
        errors[name] = {"class": type(e).__name__, "status": e.status_code, "type": e.body["error"]["type"],
                        "message": e.body["error"]["message"]}
out["errors"] = errors
print(json.dumps(out))
