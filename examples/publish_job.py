"""Publish one chat job straight to NATS, without the HTTP front end, and print its answer.

This is the worked example of the README ("Publishing jobs directly to NATS"); the test suite runs it
(tests/nats.rs). Message formats: schemas/v1/job.schema.json and schemas/v1/frame.schema.json.

usage: python examples/publish_job.py NATS_URL MODEL "your question"
"""
import asyncio
import json
import sys
import uuid

import nats


async def main(url: str, model: str, question: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    job_id = str(uuid.uuid4())
    reply_to = f"my-app.replies.{job_id}"  # any subject you subscribe to
    # 1. Subscribe to the reply subject BEFORE publishing, so no frame is missed.
    sub = await nc.subscribe(reply_to)
    # 2. Publish the job to JetStream on onnxchat.v1.jobs.<model>; Nats-Msg-Id makes retries idempotent.
    job = {
        "job_id": job_id,
        "model": model,
        "reply_to": reply_to,
        "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}],
        "sampling": {"temperature": 0},
        "max_tokens": 32,
    }
    subject = "onnxchat.v1.jobs." + "".join(
        c if c.isascii() and (c.isalnum() or c in "-_") else "".join(f"~{b:02X}" for b in c.encode())
        for c in model
    )
    await js.publish(subject, json.dumps(job).encode(), headers={"Nats-Msg-Id": job_id})
    # 3. Read frames in seq order until "done" or "error".
    text, next_seq = "", 0
    while True:
        msg = await sub.next_msg(timeout=120)
        frame = json.loads(msg.data)
        if frame["seq"] < next_seq:
            continue  # a repeated frame
        next_seq = frame["seq"] + 1
        if frame["type"] == "delta":
            text += frame["text"]
        elif frame["type"] == "done":
            print(json.dumps({"text": text, "finish_reason": frame["finish_reason"], "usage": frame["usage"]}))
            break
        else:
            print(json.dumps({"error": frame["error"]}))
            sys.exit(1)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
