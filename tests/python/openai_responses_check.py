"""Drives a running onnx-chat server's Responses API with the official OpenAI Python SDK and the OpenAI
Agents SDK, unchanged.

usage: python openai_responses_check.py BASE_URL MODEL
Prints one JSON object with what the SDKs saw; the Rust test (tests/responses_api.rs) checks it.
"""
import asyncio
import json
import sys

import openai
from openai import OpenAI, AsyncOpenAI
from pydantic import BaseModel, Field

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
question = "Write a haiku about the sea."
GREEDY = {"temperature": 0}
out = {"sdk_version": openai.__version__}

r = client.responses.create(model=model, input=question, max_output_tokens=32, **GREEDY)
out["create"] = {"id": r.id, "object": r.object, "status": r.status, "text": r.output_text,
                 "items": [i.type for i in r.output], "usage": r.usage.model_dump(),
                 "incomplete": r.incomplete_details.model_dump() if r.incomplete_details else None,
                 "store": r.store}

# The stream helper: typed events. A cut answer ends with `response.incomplete`, which the helper's
# get_final_response() does not take (it waits for `response.completed`): the terminal event's response.
with client.responses.stream(model=model, input=question, max_output_tokens=32, **GREEDY) as s:
    seen = list(s)
    events = [e.type for e in seen]
    final = seen[-1].response
out["stream"] = {"events": events, "text": final.output_text, "status": final.status,
                 "usage": final.usage.model_dump()}

# previous_response_id: the stored conversation continues (its prefix from the prefix cache).
r2 = client.responses.create(model=model, previous_response_id=r.id, input="And another one?",
                             max_output_tokens=16, **GREEDY)
out["continued"] = {"status": r2.status, "previous": r2.previous_response_id, "usage": r2.usage.model_dump()}

# Retrieve, list input items, delete, and a response that was not stored.
got = client.responses.retrieve(r.id)
items = client.responses.input_items.list(r.id)
out["retrieve"] = {"text": got.output_text, "input_items": [i.type for i in items.data],
                   "first_text": items.data[0].content[0].text}
deleted = client.responses.delete(r.id)
try:
    client.responses.retrieve(r.id)
    out["after_delete"] = None
except openai.NotFoundError as e:
    out["after_delete"] = e.status_code
unstored = client.responses.create(model=model, input=question, max_output_tokens=16, store=False, **GREEDY)
try:
    client.responses.retrieve(unstored.id)
    out["unstored"] = None
except openai.NotFoundError as e:
    out["unstored"] = e.status_code


# responses.parse with a Pydantic model: the grammar makes the random model's answer valid.
class Answer(BaseModel):
    city: str = Field(max_length=10)
    days: int


parsed = client.responses.parse(model=model, input="Plan a trip.", text_format=Answer, max_output_tokens=80,
                                temperature=1, extra_body={"seed": 5})
out["parse"] = {"parsed": parsed.output_parsed.model_dump() if parsed.output_parsed else None,
                "status": parsed.status}

# Function tools: a forced call, its output sent back with the call.
tools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                         "required": ["city"], "additionalProperties": False}, "strict": True}]
ask = [{"role": "user", "content": "Weather in Paris?"}]
r = client.responses.create(model=model, input=ask, tools=tools, max_output_tokens=200, temperature=1,
                            tool_choice={"type": "function", "name": "get_weather"}, extra_body={"seed": 3})
calls = [i for i in r.output if i.type == "function_call"]
out["tool"] = {"status": r.status, "calls": [{"name": c.name, "arguments": json.loads(c.arguments),
                                               "call_id": c.call_id} for c in calls]}
follow = ask + [c.model_dump() for c in calls] + [
    {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 degrees"}]
r = client.responses.create(model=model, input=follow, tools=tools, max_output_tokens=16, **GREEDY)
out["tool_output"] = {"status": r.status, "input_tokens": r.usage.input_tokens}
# Streamed, the call's arguments arrive as function_call_arguments events.
with client.responses.stream(model=model, input=ask, tools=tools, max_output_tokens=200, temperature=1,
                             tool_choice="required", parallel_tool_calls=False, extra_body={"seed": 4}) as s:
    events = [e.type for e in s]
    final = s.get_final_response()
out["tool_stream"] = {"events": events, "calls": [i.name for i in final.output if i.type == "function_call"]}

# Errors arrive as the SDK's typed exceptions.
errors = {}
for name, call in [
    ("built_in_tool", lambda: client.responses.create(model=model, input=question, tools=[{"type": "web_search"}])),
    ("unknown_previous", lambda: client.responses.create(model=model, input=question, previous_response_id="resp_nope")),
    ("unknown_model", lambda: client.responses.create(model="nope", input=question)),
]:
    try:
        call()
        errors[name] = None
    except openai.APIStatusError as e:
        errors[name] = {"class": type(e).__name__, "status": e.status_code, "param": e.body.get("param")
                        if isinstance(e.body, dict) else None}
out["errors"] = errors


# The OpenAI Agents SDK: an agent with one function tool, the tool forced on the first turn.
async def agent_run():
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"Sunny in {city}"

    aclient = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    agent = Agent(
        name="weather", instructions="Answer weather questions with the tool.", tools=[get_weather],
        model=OpenAIResponsesModel(model=model, openai_client=aclient),
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                                     max_tokens=400, extra_body={"seed": 7}),
        tool_use_behavior="stop_on_first_tool")
    result = await Runner.run(agent, "Weather in Paris?", max_turns=3)
    return {"final_output": result.final_output, "tool_calls": seen,
            "items": [i.type for i in result.new_items]}


out["agent"] = asyncio.run(agent_run())
print(json.dumps(out))
