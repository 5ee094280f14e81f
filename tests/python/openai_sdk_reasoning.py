"""Thinking through the official OpenAI Python SDK, unchanged: `chat_template_kwargs` goes in `extra_body`
(as with vLLM) and the thoughts come back as the message's / deltas' `reasoning_content` (an extra field
the SDK keeps).

usage: python openai_sdk_reasoning.py BASE_URL MODEL GRAMMAR
GRAMMAR (a Lark grammar, the server's extension) makes the tiny random test model write a thought channel.
Prints one JSON object with what the SDK saw; the Rust test (tests/openai_sdk.rs) checks it.
"""
import json
import sys

from openai import OpenAI

base, model, grammar = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
messages = [{"role": "user", "content": "Why is the sky blue?"}]
extra = {"chat_template_kwargs": {"enable_thinking": True},
         "response_format": {"type": "grammar", "grammar": grammar}}
out = {}

r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=60,
                                   extra_body=extra)
m = r.choices[0].message
out["reasoning"] = getattr(m, "reasoning_content", None)
out["content"] = m.content
details = r.usage.completion_tokens_details
out["reasoning_tokens"] = details.reasoning_tokens if details else None

reasoning, content = "", ""
for c in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=60,
                                        stream=True, extra_body=extra):
    if c.choices:
        reasoning += getattr(c.choices[0].delta, "reasoning_content", None) or ""
        content += c.choices[0].delta.content or ""
out["stream_reasoning"], out["stream_content"] = reasoning, content
print(json.dumps(out))
