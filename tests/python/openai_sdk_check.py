"""Drives a running onnx-chat server with the official OpenAI Python SDK, unchanged.

usage: python openai_sdk_check.py BASE_URL MODEL [IMAGE_FILE]
With IMAGE_FILE (a PNG), the question carries that image as a data URL in front of its text.
Prints one JSON object with what the SDK saw; the Rust test (tests/openai_sdk.rs) checks it.
"""
import base64
import json
import sys

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
messages = [{"role": "user", "content": "Write a haiku about the sea."}]
if len(sys.argv) > 3:
    data = base64.b64encode(open(sys.argv[3], "rb").read()).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": "Write a haiku about the sea."}]}]
out = {"sdk_version": openai.__version__}

out["models"] = [m.id for m in client.models.list().data]

r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32)
out["text"] = r.choices[0].message.content
out["finish_reason"] = r.choices[0].finish_reason
out["usage"] = r.usage.model_dump()
out["object"] = r.object

chunks = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=32, stream=True,
    stream_options={"include_usage": True},
)
text, finish, usage, n = "", None, None, 0
for c in chunks:
    n += 1
    if c.choices:
        text += c.choices[0].delta.content or ""
        finish = c.choices[0].finish_reason or finish
    if c.usage is not None:
        usage = c.usage.model_dump()
out["stream_text"], out["stream_finish_reason"], out["stream_usage"], out["stream_chunks"] = text, finish, usage, n

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    out["not_found"] = None
except openai.NotFoundError as e:
    out["not_found"] = {"status": e.status_code, "code": e.code}

try:
    client.chat.completions.create(model=model, messages=messages, temperature=-1)
    out["bad_request"] = None
except openai.BadRequestError as e:
    out["bad_request"] = {"status": e.status_code, "param": e.param}

print(json.dumps(out))
