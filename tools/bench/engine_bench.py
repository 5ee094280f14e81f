"""The serving-engine sections of `make bench` (imported by bench.py): the prefix cache over a multi-turn
conversation, cache-aware routing over NATS, and chunked prefill's effect on a running stream.

  cache    `serve` with the prefix cache (default) vs `serve --kv-cache-mb 0`, side by side: a 6-turn
           conversation (~300 new prompt tokens a turn, 32-token answers, greedy); time to first token per
           turn, medians over --conv conversations; the turns alternate between the servers.
  routing  NATS + 2 workers (threads/2 each) and two front ends on them, one with --prefix-routing (default)
           and one without; the same 6-turn conversations through each (own cache_salt per front end, so
           they never share KV): share of turns 2..6 that reused KV (cached_tokens > 0) and TTFT per turn.
  gap      one stream decoding while a 2 000-token prompt arrives, for each --prefill-chunk in --chunks
           (and one-shot): the stream's inter-token gaps (p50/p99/max) during the long prefill, the long
           prompt's TTFT alone, and for the target "max gap <= one chunk + two decode steps" the longest
           prefill step of the prompt alone (embedding + decoder run of one chunk, from the ORT trace
           shim) and the stream's median step before the long prompt arrived.
  batch    continuous batching: `serve` (default --max-batch) vs `serve --max-batch 1` (sequences take turns),
           side by side, one worker (--max-concurrent 8, no prefix cache); for each --streams count (1,2,4,8)
           that many streaming requests at once (different ~60-token prompts, --batch-tokens new tokens each,
           ignore_eos): aggregate decode tokens/s while all of them decode (tokens in the window from the last
           stream's first token to the first stream's last, over its length) and p50/p99 inter-token latency
           over every stream's gaps; medians over --batch-reps repeats, the two servers alternating.
"""
import http.client
import json
import os
import random
import threading
import time

# bench.py's module (helpers and its settings: BIN, SERVER_ENV), set by bench.py before use.
B = None

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def words(n, seed):
    """n pseudo-words, deterministic per seed (the bench tokenizer splits each into a few tokens)."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 7))) for _ in range(n))


def ttft(port, body):
    """(time to first token in ms, full text, usage) of a streaming request."""
    r = B.chat_stream(port, dict(body, stream=True, return_token_ids=True,
                                 stream_options={"include_usage": True}))
    first = (r["times"][0] - r["t_send"]) / 1e6 if r["times"] else None
    return first, r["ids"], r["usage"]


def turn_body(name, messages, max_tokens=32):
    return {"model": name, "messages": messages, "max_tokens": max_tokens, "temperature": 0}


def conversation_turns(seed, turns, words_per_turn):
    return [f"Part {t + 1}. Read this and answer briefly: {words(words_per_turn, seed * 100 + t)}"
            for t in range(turns)]


def run_conversation(port, name, user_turns, salt=None):
    """Runs the turns in order (each answer becomes the assistant message); per turn: ttft ms, prompt
    tokens, cached tokens."""
    msgs, out = [], []
    for text in user_turns:
        msgs.append({"role": "user", "content": text})
        body = turn_body(name, msgs)
        if salt:
            body["cache_salt"] = salt
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
        t0 = time.perf_counter()
        dt, r = B.chat(conn, dict(body, stream=False))
        conn.close()
        # TTFT from the answer's own timings (queue + preprocessing + encoders and prefill), so one
        # non-streamed request per turn gives both the answer and its TTFT.
        tm = r.get("timings", {})
        u = r["usage"]
        out.append({"ttft_ms": tm.get("preprocess_ms", 0) + tm.get("prefill_ms", 0) + tm.get("queued_ms", 0),
                    "wall_ms": (time.perf_counter() - t0) * 1e3, "prompt_tokens": u["prompt_tokens"],
                    "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)})
        msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
    return out


def cache_section(model_dir, quant, threads, conversations, turns=6, words_per_turn=60):
    ports = {"on": B.free_port(), "off": B.free_port()}
    procs = [B.Proc(f"cache-{k}", [B.BIN, "serve", "--model", model_dir, "--quant", quant, "--threads",
                                   str(threads), "--host", "127.0.0.1", "--port", str(p)] +
                    (["--kv-cache-mb", "0"] if k == "off" else []), env=B.SERVER_ENV)
             for k, p in ports.items()]
    try:
        for p in ports.values():
            B.wait_ready(p, procs)
        name = B.served_name(ports["on"])
        per = {"on": [], "off": []}
        for c in range(conversations):
            user_turns = conversation_turns(c + 1, turns, words_per_turn)
            order = ("on", "off") if c % 2 == 0 else ("off", "on")
            for k in order:
                B.log(f"== cache {k}: conversation {c + 1}/{conversations}")
                per[k].append(run_conversation(ports[k], name, user_turns))
        out = {}
        for k, convs in per.items():
            out[k] = [{"turn": t + 1,
                       "ttft_ms": B.median([cv[t]["ttft_ms"] for cv in convs]),
                       "prompt_tokens": B.median([cv[t]["prompt_tokens"] for cv in convs]),
                       "cached_tokens": B.median([cv[t]["cached_tokens"] for cv in convs])}
                      for t in range(turns)]
        return out
    finally:
        for p in procs:
            p.stop()


def routing_section(model_dir, quant, threads, conversations, turns=6, words_per_turn=60):
    nats = B.NatsServer()
    wt = max(1, threads // 2)
    ports = {"routing": B.free_port(), "queue": B.free_port()}
    procs = []
    for k, p in ports.items():
        procs.append(B.Proc(f"route-frontend-{k}", [B.BIN, "frontend", "--nats-url", nats.url, "--host", "127.0.0.1",
                                                    "--port", str(p), "--prefix-routing",
                                                    "true" if k == "routing" else "false"]))
    for w in range(2):
        procs.append(B.Proc(f"route-worker{w}", [B.BIN, "worker", "--model", model_dir, "--quant", quant,
                                                 "--threads", str(wt), "--nats-url", nats.url,
                                                 "--max-concurrent", "2"], env=B.SERVER_ENV))
    try:
        for p in ports.values():
            B.wait_ready(p, procs, workers=2)
        name = B.served_name(ports["routing"])
        out = {}
        for k, port in ports.items():
            convs = []
            for c in range(conversations):
                B.log(f"== routing {k}: conversation {c + 1}/{conversations}")
                convs.append(run_conversation(port, name, conversation_turns(50 + c, turns, words_per_turn),
                                              salt=f"bench-{k}-{c}"))
            later = [t for cv in convs for t in cv[1:]]
            out[k] = {"hit_rate": sum(1 for t in later if t["cached_tokens"] > 0) / max(1, len(later)),
                      "turns": [{"turn": t + 1, "ttft_ms": B.median([cv[t]["ttft_ms"] for cv in convs]),
                                 "cached_tokens": B.median([cv[t]["cached_tokens"] for cv in convs])}
                                for t in range(turns)]}
        return out
    finally:
        for p in procs:
            p.stop()
        nats.stop()


def stream_until(port, body, stop, times):
    """Streams `body` (ignore_eos), appending each token's arrival time to `times`, until `stop` is set;
    then hangs up, which cancels the generation."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    conn.request("POST", "/v1/chat/completions", headers={"content-type": "application/json"},
                 body=json.dumps(dict(body, stream=True, return_token_ids=True, ignore_eos=True)))
    r = conn.getresponse()
    while not stop.is_set():
        line = r.readline()
        if not line or line.strip() == b"data: [DONE]":
            break
        if line.startswith(b"data:") and b"token_ids" in line:
            now = time.monotonic_ns()
            obj = json.loads(line[5:])
            for ch in obj.get("choices", []):
                times.extend([now] * len((ch.get("delta") or {}).get("token_ids") or []))
    conn.close()


def gap_section(model_dir, quant, threads, chunks, shim, long_words=380, stream_tokens=4000):
    out = {}
    for chunk in chunks:
        port = B.free_port()
        extra = ["--prefill-chunk", str(chunk if chunk else 1 << 20), "--kv-cache-mb", "0"]
        trace = B.Trace(os.path.join(B.BENCH_DIR, f"trace-gap-{chunk}.txt"))
        env = dict(B.SERVER_ENV, ORT_DYLIB_PATH=shim, ORT_TRACE_REAL_LIB=B.real_ort_lib(),
                   ORT_TRACE_FILE=trace.path)
        proc = B.Proc(f"gap-{chunk}", [B.BIN, "serve", "--model", model_dir, "--quant", quant, "--threads",
                                       str(threads), "--host", "127.0.0.1", "--port", str(port)] + extra,
                      env=env)
        try:
            B.wait_ready(port, [proc])
            name = B.served_name(port)
            long_msg = [{"role": "user", "content": words(long_words, 7)}]
            # Alone first: the long prompt's prefill, and from the trace its longest step (the
            # embedding run plus the decoder run of one chunk; later chunks attend to more positions).
            trace.new_runs()
            t0 = time.monotonic_ns()
            alone, _, u = ttft(port, turn_body(name, long_msg, 1))
            runs = sorted((r for r in trace.new_runs() if r[2] >= t0), key=lambda r: r[2])
            longest_step = 0.0
            for i, r in enumerate(runs):
                if r[1] >= 3:  # a decoder run; the embedding run just before it belongs to the step
                    start = runs[i - 1][2] if i > 0 and runs[i - 1][1] < 3 else r[2]
                    longest_step = max(longest_step, (r[3] - start) / 1e6)
            stop = threading.Event()
            times = []
            th = threading.Thread(target=stream_until, args=(port, turn_body(
                name, [{"role": "user", "content": "Tell a story."}], stream_tokens), stop, times))
            th.start()
            while len(times) < 20 and th.is_alive():  # the stream is decoding
                time.sleep(0.01)
            t_long = time.monotonic_ns()
            during, _, _ = ttft(port, turn_body(name, long_msg, 1))
            t_end = time.monotonic_ns()
            time.sleep(0.5)  # a few steps after it
            stop.set()
            th.join()
            gaps = [(b - a) / 1e6 for a, b in zip(times, times[1:])]
            inside = [(b - a) / 1e6 for a, b in zip(times, times[1:]) if b > t_long and a < t_end]
            before = [(b - a) / 1e6 for a, b in zip(times, times[1:]) if b < t_long]
            step = B.median(before) or B.median(gaps)
            out[str(chunk or "one-shot")] = {
                "chunk": chunk, "long_prompt_tokens": u["prompt_tokens"], "long_ttft_alone_ms": alone,
                "long_ttft_during_ms": during, "decode_step_ms": step,
                "chunk_prefill_ms": longest_step or None,
                "gap_p50_ms": B.pct(inside, 0.5), "gap_p99_ms": B.pct(inside, 0.99),
                "gap_max_ms": max(inside) if inside else None}
            B.log(f"   chunk {chunk or 'one-shot'}: max gap {out[str(chunk or 'one-shot')]['gap_max_ms']} ms")
        finally:
            proc.stop()
    return out


def concurrent_streams(port, name, n, tokens, seed):
    """n streaming requests at once; per stream the token arrival times (monotonic ns)."""
    out = [None] * n

    def one(i):
        body = turn_body(name, [{"role": "user", "content": f"Story {i}: {words(12, seed * 31 + i)}"}], tokens)
        r = B.chat_stream(port, dict(body, stream=True, return_token_ids=True, ignore_eos=True))
        out[i] = r["times"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def stream_stats(times):
    """(aggregate tokens/s while every stream decodes, inter-token gaps in ms inside that window, all gaps
    in ms: these also hold the waits for the other streams' prompts, which arrive at the same time)."""
    start = max(t[0] for t in times)
    end = min(t[-1] for t in times)
    gaps = [(b - a) / 1e6 for t in times for a, b in zip(t, t[1:])]
    steady = [(b - a) / 1e6 for t in times for a, b in zip(t, t[1:]) if a >= start and b <= end]
    if end <= start:
        return None, steady, gaps
    inside = sum(sum(1 for x in t if start < x <= end) for t in times)
    return inside / ((end - start) / 1e9), steady, gaps


def batch_section(model_dir, quant, threads, streams, tokens, reps):
    ports = {"on": B.free_port(), "off": B.free_port()}
    common_args = ["--model", model_dir, "--quant", quant, "--threads", str(threads), "--host", "127.0.0.1",
                   "--max-concurrent", "8", "--kv-cache-mb", "0"]
    procs = [B.Proc(f"batch-{k}", [B.BIN, "serve", *common_args, "--port", str(p)] +
                    (["--max-batch", "1"] if k == "off" else []), env=B.SERVER_ENV)
             for k, p in ports.items()]
    try:
        for p in ports.values():
            B.wait_ready(p, procs)
        name = B.served_name(ports["on"])
        for k in ports:  # warm-up
            concurrent_streams(ports[k], name, 2, 8, 0)
        per = {k: {n: [] for n in streams} for k in ports}
        for rep in range(reps):
            for n in streams:
                order = ("on", "off") if (rep + n) % 2 == 0 else ("off", "on")
                for k in order:
                    tps, steady, gaps = stream_stats(concurrent_streams(ports[k], name, n, tokens, rep * 10 + n))
                    per[k][n].append({"tps": tps, "p50": B.pct(steady, 0.5), "p99": B.pct(steady, 0.99),
                                      "all_p99": B.pct(gaps, 0.99), "all_max": max(gaps) if gaps else None})
                    B.log(f"   batch {k}: {n} streams rep {rep}: {B.fmt(tps, 2)} tok/s, "
                          f"gap p50 {B.fmt(per[k][n][-1]['p50'], 0)} p99 {B.fmt(per[k][n][-1]['p99'], 0)} ms")
        return {k: {str(n): {m: B.median([r[m] for r in v[n]]) for m in ("tps", "p50", "p99", "all_p99", "all_max")}
                    for n in streams} for k, v in per.items()}
    finally:
        for p in procs:
            p.stop()


def divergence_section(model_dir, threads, positions):
    """tools/bench/quant_divergence.py (in the fixtures venv): KL and top-1 agreement vs fp32, step time."""
    import subprocess
    r = subprocess.run([B.FIXTURES_PY, os.path.join(B.ROOT, "tools", "bench", "quant_divergence.py"), model_dir,
                        "--positions", str(positions), "--threads", str(threads)],
                       check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def rows(results):
    """Table rows (section, case, metric, ours, reference, ratio) of these sections."""
    out = []
    c = results.get("cache")
    if c:
        for on, off in zip(c["on"], c["off"]):
            out.append(("prefix cache", f"turn {on['turn']} ({B.fmt(on['prompt_tokens'], 0)} prompt tok, "
                        f"{B.fmt(on['cached_tokens'], 0)} cached)", "TTFT ms: cache on vs --kv-cache-mb 0",
                        B.fmt(on["ttft_ms"], 0), B.fmt(off["ttft_ms"], 0), B.ratio(on["ttft_ms"], off["ttft_ms"])))
    r = results.get("routing")
    if r:
        out.append(("routing", "turns 2..6 reusing KV", "hit rate: --prefix-routing on vs off",
                    f"{100 * r['routing']['hit_rate']:.0f}%", f"{100 * r['queue']['hit_rate']:.0f}%", ""))
        for a, b in zip(r["routing"]["turns"], r["queue"]["turns"]):
            out.append(("routing", f"turn {a['turn']}", "TTFT ms: routing on vs off", B.fmt(a["ttft_ms"], 0),
                        B.fmt(b["ttft_ms"], 0), B.ratio(a["ttft_ms"], b["ttft_ms"])))
    g = results.get("gap")
    if g:
        for k, v in g.items():
            bound = (v["chunk_prefill_ms"] or 0) + 2 * (v["decode_step_ms"] or 0)
            out.append(("chunked prefill", f"--prefill-chunk {k}, {v['long_prompt_tokens']}-tok prompt arrives",
                        "stream gap ms p50 / p99 / max (bound: chunk + 2 steps)",
                        f"{B.fmt(v['gap_p50_ms'], 0)} / {B.fmt(v['gap_p99_ms'], 0)} / {B.fmt(v['gap_max_ms'], 0)}",
                        B.fmt(bound, 0), ""))
            out.append(("chunked prefill", f"--prefill-chunk {k}", "long prompt TTFT ms, alone",
                        B.fmt(v["long_ttft_alone_ms"], 0), "", ""))
    b = results.get("batch")
    if b:
        one = b["on"].get("1", {}).get("tps")
        for n, on in b["on"].items():
            off = b["off"][n]
            out.append(("batching", f"{n} concurrent streams", "aggregate decode tok/s: batched vs --max-batch 1",
                        B.fmt(on["tps"], 2), B.fmt(off["tps"], 2), B.ratio(on["tps"], off["tps"])))
            out.append(("batching", f"{n} concurrent streams", "aggregate tok/s vs 1 stream (batched)",
                        B.fmt(on["tps"], 2), B.fmt(one, 2), B.ratio(on["tps"], one)))
            out.append(("batching", f"{n} concurrent streams", "inter-token ms p50 / p99 (all decoding): batched vs off",
                        f"{B.fmt(on['p50'], 0)} / {B.fmt(on['p99'], 0)}",
                        f"{B.fmt(off['p50'], 0)} / {B.fmt(off['p99'], 0)}", B.ratio(on["p99"], off["p99"])))
            out.append(("batching", f"{n} concurrent streams", "inter-token ms p99 / max incl. the others' prompts",
                        f"{B.fmt(on.get('all_p99'), 0)} / {B.fmt(on.get('all_max'), 0)}",
                        f"{B.fmt(off.get('all_p99'), 0)} / {B.fmt(off.get('all_max'), 0)}", ""))
    d = results.get("divergence")
    if d:
        base = d.get("FP32", {}).get("decode_ms")
        for spec, v in d.items():
            out.append(("quantization", f"{spec} vs FP32 graphs, {v['positions']} positions of text",
                        "mean KL nats; top-1 agreement; decode step ms (ref: FP32)",
                        f"{v['kl_mean']:.4f}; {100 * v['top1']:.1f}%; {B.fmt(v['decode_ms'], 1)}",
                        B.fmt(base, 1), B.ratio(v["decode_ms"], base)))
    return out
