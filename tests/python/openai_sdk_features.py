"""Structured outputs, tools, logprobs and text completions through the official OpenAI Python SDK.

usage: python openai_sdk_features.py BASE_URL MODEL
Prints one JSON object with what the SDK saw; the Rust test (tests/openai_sdk.rs) checks it.
"""
import json
import sys
from typing import List, Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
out = {}


class Item(BaseModel):
    sku: Literal["a1", "b2", "c3"]
    qty: int = Field(ge=1, le=9)


class Order(BaseModel):
    customer: str = Field(max_length=8)
    items: List[Item] = Field(min_length=1, max_length=3)
    paid: bool


# chat.completions.parse: the SDK sends a strict json_schema and parses the answer into the model.
parsed = []
for seed in range(6):
    r = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "An order, please."}],
        response_format=Order, temperature=1, seed=seed, max_tokens=600,
    )
    p = r.choices[0].message.parsed
    parsed.append({"type": type(p).__name__, "value": p.model_dump() if p else None,
                   "finish_reason": r.choices[0].finish_reason})
out["parsed"] = parsed


class GetWeather(BaseModel):
    """Current weather in a city."""
    city: str = Field(max_length=10)
    unit: Literal["c", "f"]


tools = [openai.pydantic_function_tool(GetWeather)]
messages = [{"role": "user", "content": "What is the weather in Oslo?"}]

# A tool round trip: the call, its result, the answer.
r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                   temperature=1, seed=3, max_tokens=300)
msg = r.choices[0].message
call = msg.tool_calls[0]
args = GetWeather.model_validate_json(call.function.arguments)
out["call"] = {"finish_reason": r.choices[0].finish_reason, "name": call.function.name,
               "id": call.id, "args": args.model_dump()}
messages.append(msg.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})})
r = client.chat.completions.create(model=model, messages=messages, tools=tools, temperature=0, max_tokens=8)
out["after_tool"] = {"finish_reason": r.choices[0].finish_reason,
                     "content_is_str": isinstance(r.choices[0].message.content, str)}

# Streamed tool calls, reassembled by the SDK's stream helper (and parsed into the strict tool's model).
with client.chat.completions.stream(model=model, messages=messages[:1], tools=tools, tool_choice="required",
                                    temperature=1, seed=4, max_tokens=300) as stream:
    for _ in stream:
        pass
    final = stream.get_final_completion()
c = final.choices[0]
out["stream_call"] = {"finish_reason": c.finish_reason,
                      "calls": [{"name": t.function.name, "id": t.id,
                                 "parsed": t.function.parsed_arguments.model_dump()
                                 if t.function.parsed_arguments else None}
                                for t in c.message.tool_calls or []]}

# logprobs.
r = client.chat.completions.create(model=model, messages=messages[:1], temperature=0, max_tokens=4,
                                   logprobs=True, top_logprobs=3)
lp = r.choices[0].logprobs.content
out["logprobs"] = {"n": len(lp), "top": [len(t.top_logprobs) for t in lp],
                   "first": {"token": lp[0].token, "logprob": lp[0].logprob, "bytes": lp[0].bytes}}

# The legacy text completion.
r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
out["completion"] = {"object": r.object, "text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                     "tokens": len(r.choices[0].logprobs.tokens), "usage": r.usage.model_dump()}
text = ""
for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0,
                                       stream=True):
    text += chunk.choices[0].text if chunk.choices else ""
out["completion_stream_text"] = text

# Retrieving one model.
m = client.models.retrieve(model)
out["model"] = {"id": m.id, "object": m.object}

print(json.dumps(out))
