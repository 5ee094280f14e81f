"""Recovery time after a worker's death: a seeded 1 000-token answer whose worker is SIGKILLed once the
client has 900 of its frames, run twice over NATS with two workers — once as a job without
`progress_to` (every attempt starts over: the new worker decodes the 900 tokens again before the client
gets token 901) and once with it (the new worker prefills prompt + 900 delivered ids and continues).
This script is the client in both: it publishes the job, reads the frames and, for the second run,
answers the progress requests itself as schemas/v1/progress.schema.json describes. Reported: the time
from the kill to the first new frame, and from the kill to the end.

usage: .venv/bin/python tools/bench/recovery.py BINARY MODEL_DIR [--tokens 1000] [--kill-at 900]
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import nats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_workers(nc, n: int, timeout: float = 600.0) -> None:
    seen: set[str] = set()
    sub = await nc.subscribe("onnxchat.v1.workers.heartbeat")
    end = time.monotonic() + timeout
    while len(seen) < n:
        msg = await sub.next_msg(timeout=max(1.0, end - time.monotonic()))
        seen.add(json.loads(msg.data)["worker_id"])
    await sub.unsubscribe()


async def one_run(nc, js, workers: dict, args, continued: bool) -> dict:
    job_id = str(uuid.uuid4())
    reply_to = f"bench.replies.{job_id}"
    progress_to = f"bench.progress.{job_id}"
    frames = await nc.subscribe(reply_to)
    state = {"granted": 0, "seen": 0, "next_seq": 0, "ids": [], "done": False}

    async def answer(msg):
        state["granted"] = max(state["granted"], state["seen"]) + 1
        reply = {"attempt": state["granted"], "next_seq": state["next_seq"],
                 "choices": [{"index": 0, "token_ids": state["ids"]}] if state["ids"] else [],
                 "done": state["done"]}
        await msg.respond(json.dumps(reply).encode())

    if continued:
        await nc.subscribe(progress_to, cb=answer)
    busy = await nc.subscribe("onnxchat.v1.workers.heartbeat")
    job = {"job_id": job_id, "model": args.name, "reply_to": reply_to,
           "messages": [{"role": "user", "content": [{"type": "text", "text": f"A long story, {job_id[:8]}."}]}],
           "sampling": {"temperature": 1.0, "seed": 11}, "max_tokens": args.tokens, "ignore_eos": True}
    if continued:
        job["progress_to"] = progress_to
    await js.publish("onnxchat.v1.jobs." + args.name, json.dumps(job).encode(), headers={"Nats-Msg-Id": job_id})
    victim, killed_at, first_after, t0 = None, None, None, time.monotonic()
    while True:
        msg = await frames.next_msg(timeout=600)
        f = json.loads(msg.data)
        if f["attempt"] < state["granted"]:
            continue  # a superseded attempt
        state["seen"] = max(state["seen"], f["attempt"])
        if f["seq"] < state["next_seq"]:
            continue  # an attempt that started over: already passed on
        state["next_seq"] = f["seq"] + 1
        if killed_at is not None and first_after is None:
            first_after = time.monotonic()
        if f["type"] == "delta":
            state["ids"] += f.get("token_ids", [])
        else:
            state["done"] = True
            break
        if victim is None:
            # The worker announcing an active job serves this one.
            while victim is None:
                hb = json.loads((await busy.next_msg(timeout=30)).data)
                if hb.get("active", 0) > 0:
                    victim = hb["worker_id"]
        if killed_at is None and state["next_seq"] >= args.kill_at:
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait()
            killed_at = time.monotonic()
    end = time.monotonic()
    await frames.unsubscribe()
    await busy.unsubscribe()
    return {"mode": "continue" if continued else "start over", "victim": victim,
            "ids": len(state["ids"]), "kill_to_next_frame_s": round(first_after - killed_at, 2),
            "kill_to_end_s": round(end - killed_at, 2), "total_s": round(end - t0, 2),
            "final": f["type"]}


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("binary")
    p.add_argument("model")
    p.add_argument("--name", default="bench")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--kill-at", type=int, default=900)
    p.add_argument("--ack-wait", default="2")
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    port = free_port()
    nats_srv = subprocess.Popen([".venv/bin/nats-server", "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", tmp],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    time.sleep(1)

    def spawn(wid: str) -> subprocess.Popen:
        log = open(os.path.join(tmp, f"{wid}-{time.monotonic_ns()}.log"), "w")
        return subprocess.Popen([args.binary, "worker", "--nats-url", url, "--model", args.model,
                                 "--served-model-name", args.name, "--threads", "2", "--worker-id", wid,
                                 "--ack-wait", args.ack_wait], stdout=log, stderr=log)

    workers = {w: spawn(w) for w in ("w0", "w1")}
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await wait_workers(nc, 2)
        for continued in (False, True):
            r = await one_run(nc, js, workers, args, continued)
            print(json.dumps(r), flush=True)
            w = r["victim"]
            workers[w] = spawn(w)
            await wait_workers(nc, 2)
    finally:
        await nc.close()
        for w in workers.values():
            w.kill()
        nats_srv.kill()


if __name__ == "__main__":
    asyncio.run(main())
