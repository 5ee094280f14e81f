"""Two onnx-chat binaries side by side on the same model: time to first token and decode speed of single
requests, alternating between the servers (A, B, B, A, ...) so that machine noise hits both; medians.
For checking that a change costs single requests nothing.

usage: .venv/bin/python tools/bench/ab_binaries.py OLD_BIN NEW_BIN [--model DIR] [--quant Q4_MIXED]
           [--lengths 32,512] [--repeats 4] [--new-tokens 128] [--threads N]
"""
import json
import os
import sys

import bench as B


def unique(messages, tag):
    """The messages with `tag` in front of the first text, so no request reuses another's cached prefix
    (a first turn, as far as the prefix cache is concerned)."""
    out = json.loads(json.dumps(messages))
    m = out[0]
    if isinstance(m["content"], str):
        m["content"] = f"{tag} {m['content']}"
    else:
        t = next(p for p in m["content"] if p["type"] == "text")
        t["text"] = f"{tag} {t['text']}"
    return out


def one(port, name, case, new_tokens, tag):
    r = B.chat_stream(port, {"model": name, "messages": unique(case["messages"], tag), "max_tokens": new_tokens,
                             "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True})
    t = r["times"]
    ttft = (t[0] - r["t_send"]) / 1e6
    tps = (len(t) - 1) / ((t[-1] - t[0]) / 1e9) if len(t) > 1 and t[-1] > t[0] else None
    return ttft, tps


def main():
    old, new = sys.argv[1], sys.argv[2]
    model = os.path.abspath(B.arg("--model", os.path.join(B.ROOT, "target", "bench-model", "bench-gemma3n")))
    quant = B.arg("--quant", "Q4_MIXED")
    lengths = [int(x) for x in B.arg("--lengths", "32,512").split(",")]
    repeats = int(B.arg("--repeats", "4"))
    new_tokens = int(B.arg("--new-tokens", "128"))
    threads = B.arg("--threads", str(os.cpu_count()))
    cases, _ = B.prepare_cases(model, lengths)
    cases = [c for c in cases if not c["image"]]
    ports = {"old": B.free_port(), "new": B.free_port()}
    procs = [B.Proc(f"ab-{k}", [b, "serve", "--model", model, "--quant", quant, "--threads", threads, "--host",
                                "127.0.0.1", "--port", str(ports[k])])
             for k, b in (("old", old), ("new", new))]
    try:
        for p in ports.values():
            B.wait_ready(p, procs)
        name = B.served_name(ports["new"])
        for k in ports:  # warm-up
            one(ports[k], name, cases[0], 4, "warm-up")
        res = {}
        for c in cases:
            got = {"old": [], "new": []}
            for i in range(repeats):
                for k in (("old", "new") if i % 2 == 0 else ("new", "old")):
                    got[k].append(one(ports[k], name, c, new_tokens, f"Request {i}."))
            res[c["text_tokens"]] = {k: (B.median([x[0] for x in v]), B.median([x[1] for x in v]))
                                     for k, v in got.items()}
        print(f"| prompt tokens | TTFT old, ms | TTFT new, ms | new/old | decode old, tok/s | decode new, tok/s | new/old |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for n, r in res.items():
            (to, do), (tn, dn) = r["old"], r["new"]
            print(f"| {n} | {to:,.0f} | {tn:,.0f} | {tn / to:.3f}× | {do:.2f} | {dn:.2f} | {dn / do:.3f}× |")
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    main()
