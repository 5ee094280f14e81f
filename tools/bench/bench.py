"""`make bench`: onnx-chat against the model card's Python onnxruntime loop, side by side, one table.

usage: .venv/bin/python tools/bench/bench.py [--model DIR] [--quants Q4_MIXED,QUANTIZED] [--tiny DIR]
           [--tiny-quants Q4_MIXED] [--repeats 3] [--new-tokens 128] [--threads N] [--lengths 32,512]
           [--sections gen,media,nats,throughput] [--nats-requests 300] [--tp-clients 1,2,4,8]
           [--tp-tokens 32] [--out target/bench/results.json] [--bin target/release/onnx-chat]
           [--server-env K=V,...] [--media-bin PATH] [--cases p32,p512+image,...]
       .venv/bin/python tools/bench/bench.py --table target/bench/results.json     (re-print a saved run)

Sections (all by default):
  gen         per model and quantization: our server over HTTP (`onnx-chat serve`, streaming with
              return_token_ids, temperature 0) vs tools/bench/ref_loop.py on the same graphs, same ONNX Runtime
              (.venv, 1.31.1) and thread count; prompts of exactly 32 / 512 tokens, alone or after one
              1280x960 JPEG; --new-tokens new tokens. Repeats are interleaved (ours, ref, ref, ours, ...) so
              that machine noise hits both. Medians over the repeats.
  media       benches/media.rs (MediaDecoder::image_bytes / audio_bytes) vs tools/bench/ref_media.py.
  nats        a 1-token request through frontend + NATS + worker vs `serve` (in-process bus), interleaved;
              tiny model; p50/p99 of the client's latency.
  throughput  bench model: frontend + NATS + 1 worker (--threads N) vs 2 workers (--threads N/2 each), with
              1..8 concurrent clients, each sending requests back to back.
  cache, routing, gap
              bench model (the tiny model with --engine-on-tiny): the prefix cache over a 6-turn conversation,
              cache-aware routing over NATS, and chunked prefill under a running stream; see
              tools/bench/engine_bench.py. Options: --conv 2 (conversations), --chunks 128,256,512,1024,0
              (0 = one-shot), --turn-words 60 (~300 tokens a turn), --long-words 380 (~2 000 tokens).
  batch       bench model: continuous batching on (default) vs --max-batch 1, 1/2/4/8 concurrent streams:
              aggregate decode tokens/s and p50/p99 inter-token latency (engine_bench.py). Options:
              --streams 1,2,4,8, --batch-tokens 48, --batch-reps 2.
  peer        (not in the default list; needs tools/bench/peer_setup.sh, see `make bench-peer`) bench model: our
              server vs llama.cpp's llama-server on the same weights as GGUF, over HTTP: decode at 32 / 2 000 / 8 000
              tokens of context, time to first token, 1/4/8 concurrent streams (tools/bench/peer.py; its flags
              --contexts, --streams, --llama, --peer-repeats, --long-repeats, --peer-tokens).
  divergence  bench model: each quantization set (and MatMulNBits accuracy level) vs the fp32 graphs over
              --positions 2048 positions of the repository's prose: mean KL of the next-token distributions,
              top-1 agreement, decoder step time (tools/bench/quant_divergence.py, fixtures venv).

How "outside Session::run" is measured: the server is started with ORT_DYLIB_PATH pointing at
target/bench/ort_run_trace.so (tools/bench/ort_run_trace.c), a stand-in library that forwards to the real
libonnxruntime and appends (session, inputs, start, end) for every OrtApi::Run call to a trace file. For each
request, the decode window runs from the end of the prefill decoder run to the end of the last decoder run;
outside = window - time inside Run calls. The reference loop times its InferenceSession.run calls the same way.
"""
import glob
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BENCH_DIR = os.path.join(ROOT, "target", "bench")
BIN = os.path.join(ROOT, "target", "release", "onnx-chat")
FIXTURES_PY = os.path.join(ROOT, "tools", "fixtures", ".venv", "bin", "python")
VENV = os.path.join(ROOT, ".venv")
SERVER_ENV = {}  # --server-env K=V,K=V: extra environment for the gen section's server (experiments)


def arg(flag, default=None):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def median(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


def pct(v, q):
    v = sorted(v)
    if not v:
        return None
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_ort_lib():
    libs = sorted(glob.glob(os.path.join(VENV, "lib", "python3*", "site-packages", "onnxruntime", "capi",
                                         "libonnxruntime.so.*")))
    if not libs:
        sys.exit("no libonnxruntime in .venv: run `make setup`")
    return libs[-1]


def build_shim():
    out = os.path.join(BENCH_DIR, "ort_run_trace.so")
    src = os.path.join(ROOT, "tools", "bench", "ort_run_trace.c")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", out, src, "-ldl"], check=True)
    return out


def rss_peak_mb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ processes
class Proc:
    def __init__(self, name, argv, env=None):
        self.name = name
        self.log_path = os.path.join(BENCH_DIR, "logs", f"{name}.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self.log = open(self.log_path, "w")
        e = dict(os.environ, ONNX_CHAT_LOG="warn")
        e.update(env or {})
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=e, cwd=ROOT)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()

    def check(self):
        if self.p.poll() is not None:
            sys.exit(f"{self.name} exited ({self.p.returncode}); log: {self.log_path}\n" +
                     open(self.log_path).read()[-3000:])


def wait_ready(port, proc_list, workers=1, timeout=900):
    t = time.time()
    while time.time() - t < timeout:
        for p in proc_list:
            p.check()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/ready")
            r = c.getresponse()
            body = json.loads(r.read() or b"{}")
            if r.status == 200 and body.get("status") == "ready" and body.get("workers", 1) >= workers:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    sys.exit(f"server on {port} not ready after {timeout}s")


def served_name(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/v1/models")
    return json.loads(c.getresponse().read())["data"][0]["id"]


class NatsServer:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="bench-nats-")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = Proc(f"nats-{self.port}", [os.path.join(VENV, "bin", "nats-server"), "-a", "127.0.0.1", "-p",
                                               str(self.port), "-js", "-sd", os.path.join(self.dir, "js")])
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.025)
        sys.exit("nats-server did not start")

    def stop(self):
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ HTTP client
def chat(conn, body):
    """Non-streaming request on a kept-alive connection: (seconds, response)."""
    data = json.dumps(body)
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=data, headers={"content-type": "application/json"})
    r = conn.getresponse()
    raw = r.read()
    dt = time.perf_counter() - t
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {raw[:300]!r}")
    return dt, json.loads(raw)


def sse_chat(port, body, timeout=900):
    """POSTs a streaming chat request; yields the send time (monotonic ns) first, then (arrival ns, event
    object) for each `data:` event until `[DONE]`. An HTTP error or an `error` event raises."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        t_send = time.monotonic_ns()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"content-type": "application/json"})
        yield t_send
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            now = time.monotonic_ns()
            obj = json.loads(payload)
            if "error" in obj:
                raise RuntimeError(obj["error"])
            yield now, obj
    finally:
        conn.close()


def chat_stream(port, body):
    """Streaming request: send time, token arrival times (monotonic ns), ids, usage, end time."""
    events = sse_chat(port, body)
    t_send = next(events)
    ids, times, usage = [], [], None
    for now, obj in events:
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices", []):
            t_ids = (ch.get("delta") or {}).get("token_ids") or []
            ids.extend(t_ids)
            times.extend([now] * len(t_ids))
    t_done = time.monotonic_ns()
    return dict(t_send=t_send, t_done=t_done, ids=ids, times=times, usage=usage)


# ------------------------------------------------------------------------------------------------ trace
class Trace:
    def __init__(self, path):
        self.path = path
        open(path, "w").close()
        self.offset = 0

    def new_runs(self):
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        runs = []
        for line in text.splitlines():
            p = line.split()
            if len(p) == 4:
                runs.append((p[0], int(p[1]), int(p[2]), int(p[3])))
        return runs


def split_runs(runs, t_send, t_done):
    """Prefill and decode figures of one request from its OrtApi::Run records."""
    runs = sorted((r for r in runs if r[2] >= t_send and r[3] <= t_done), key=lambda r: r[2])
    dec = [r for r in runs if r[1] >= 3]        # the decoder: embeddings, PLE, positions, KV...
    if not dec:
        return {}
    prefill_ms = (dec[0][3] - runs[0][2]) / 1e6
    w0, w1 = dec[0][3], dec[-1][3]
    busy = sum(r[3] - r[2] for r in runs if r[2] >= w0 and r[3] <= w1)
    steps = len(dec) - 1
    out = {"engine_prefill_ms": prefill_ms, "prefill_run_ms": sum(r[3] - r[2] for r in runs if r[3] <= w0) / 1e6}
    if steps > 0:
        out.update(decode_window_ms=(w1 - w0) / 1e6, decode_run_ms=busy / 1e6, decode_steps=steps,
                   outside_share=1 - busy / (w1 - w0), outside_us_per_step=(w1 - w0 - busy) / steps / 1e3)
    return out


# ------------------------------------------------------------------------------------------------ gen section
class RefLoop:
    def __init__(self, model_dir, quant, threads):
        self.p = subprocess.Popen([os.path.join(VENV, "bin", "python"), os.path.join(ROOT, "tools", "bench",
                                                                                     "ref_loop.py"),
                                   model_dir, quant, str(threads)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        self.ready = json.loads(self.p.stdout.readline())

    def ask(self, cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            sys.exit("ref_loop.py died")
        return json.loads(line)

    def stop(self):
        self.p.stdin.close()
        self.p.wait(60)


def prepare_cases(model_dir, lengths):
    name = os.path.basename(os.path.normpath(model_dir))
    out = os.path.join(BENCH_DIR, "cases", name)
    path = os.path.join(out, "cases.json")
    if os.path.exists(path):
        c = json.load(open(path))
        if sorted({x["text_tokens"] for x in c["cases"]}) == sorted(lengths):
            return c["cases"], out
    if not os.path.exists(FIXTURES_PY):
        sys.exit(f"{FIXTURES_PY} missing: run `make bench-model` (it creates the generator's venv)")
    log(f"== preparing prompts for {name} (transformers processor)")
    subprocess.run([FIXTURES_PY, os.path.join(ROOT, "tools", "bench", "prepare.py"), model_dir, out,
                    os.path.join(BENCH_DIR, "media"), "--lengths", ",".join(map(str, lengths))], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
                            OMP_NUM_THREADS="1"))
    return json.load(open(path))["cases"], out


def graph_bytes(model_dir, quant):
    """Bytes of the four graphs (+ external data) the quantization set loads."""
    sets = {"FP32": ("", "", "", ""), "QUANTIZED": ("_quantized",) * 4, "Q4": ("_q4",) * 4,
            "Q4_MIXED": ("_quantized", "_q4", "_quantized", "_q4")}
    comps = ("embed_tokens", "decoder_model_merged", "vision_encoder", "audio_encoder")
    total = 0
    for comp, suf in zip(comps, sets[quant]):
        for f in glob.glob(os.path.join(model_dir, "onnx", f"{comp}{suf}.onnx*")):
            total += os.path.getsize(f)
    return total


def gen_section(model_dir, quant, threads, repeats, new_tokens, lengths, shim):
    cases, case_dir = prepare_cases(model_dir, lengths)
    only = [c for c in (arg("--cases") or "").split(",") if c]
    cases = [c for c in cases if not only or c["name"] in only]
    trace = Trace(os.path.join(BENCH_DIR, f"trace-{os.path.basename(model_dir)}-{quant}.txt"))
    port = free_port()
    log(f"== gen: {os.path.basename(model_dir)} {quant}, threads {threads}: starting server and reference loop")
    server = Proc(f"serve-{os.path.basename(model_dir)}-{quant}",
                  [BIN, "serve", "--model", model_dir, "--quant", quant, "--threads", str(threads), "--host",
                   "127.0.0.1", "--port", str(port)],
                  # the encoder and prefix caches would skip work on repeats; the reference has neither
                  env={"ORT_DYLIB_PATH": shim, "ORT_TRACE_REAL_LIB": real_ort_lib(), "ORT_TRACE_FILE": trace.path,
                       "ONNX_CHAT_ENCODER_CACHE_MB": "0", "ONNX_CHAT_KV_CACHE_MB": "0", **SERVER_ENV})
    wait_ready(port, [server])
    name = served_name(port)
    ref = RefLoop(model_dir, quant, threads)

    def body(case, n):
        return {"model": name, "messages": case["messages"], "temperature": 0, "max_tokens": n, "stream": True,
                "return_token_ids": True, "stream_options": {"include_usage": True}}

    def ours(case, n):
        trace.new_runs()
        r = chat_stream(port, body(case, n))
        runs = trace.new_runs()
        ids, times = r["ids"], r["times"]
        m = {"ids": ids, "prompt_tokens": (r["usage"] or {}).get("prompt_tokens"),
             "ttft_ms": (times[0] - r["t_send"]) / 1e6 if times else None}
        if len(times) > 1:
            m["decode_tps"] = (len(times) - 1) / ((times[-1] - times[0]) / 1e9)
        m.update(split_runs(runs, r["t_send"], r["t_done"]))
        return m

    def reference(case, n):
        r = ref.ask({"npz": os.path.join(case_dir, case["npz"]), "max_new": n})
        m = {"ids": r["ids"], "ttft_ms": r["ttft_ms"], "engine_prefill_ms": r["prefill_ms"]}
        if r["decode_steps"] > 0:
            m["decode_tps"] = r["decode_steps"] / (r["decode_ms"] / 1e3)
            m["outside_share"] = 1 - r["decode_run_ms"] / r["decode_ms"]
            m["outside_us_per_step"] = (r["decode_ms"] - r["decode_run_ms"]) / r["decode_steps"] * 1e3
        return m

    for case in cases:  # warm-up: first runs allocate arenas and page weights in
        ours(case, 4)
        reference(case, 4)
    results = {c["name"]: {"ours": [], "ref": []} for c in cases}
    for rep in range(repeats):
        for case in cases:
            order = [("ours", ours), ("ref", reference)]
            if rep % 2:
                order.reverse()
            for who, fn in order:
                m = fn(case, new_tokens)
                results[case["name"]][who].append(m)
                log(f"   {quant} {case['name']} rep {rep} {who}: ttft {m.get('ttft_ms', 0):.0f} ms, "
                    f"decode {m.get('decode_tps', 0):.2f} tok/s, {len(m['ids'])} tokens")
    peak_ours = rss_peak_mb(server.p.pid)
    peak_ref = ref.ask({"stats": True})["peak_rss_mb"]
    ref.stop()
    server.stop()
    summary = {"quant": quant, "model": os.path.basename(os.path.normpath(model_dir)), "threads": threads,
               "graph_mb": graph_bytes(model_dir, quant) / 1e6, "peak_rss_mb": {"ours": peak_ours, "ref": peak_ref},
               "cases": {}}
    for case in cases:
        res = results[case["name"]]
        row = {"prompt_tokens": case["prompt_tokens"], "image": case["image"]}
        for who in ("ours", "ref"):
            ms = res[who]
            row[who] = {k: median([m.get(k) for m in ms]) for k in
                        ("ttft_ms", "engine_prefill_ms", "decode_tps", "outside_share", "outside_us_per_step")}
            row[who]["tokens"] = median([len(m["ids"]) for m in ms])
            if row[who]["engine_prefill_ms"]:
                row[who]["prefill_tps"] = case["prompt_tokens"] / (row[who]["engine_prefill_ms"] / 1e3)
        a, b = res["ours"][0]["ids"], res["ref"][0]["ids"]
        row["same_ids"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        row["prompt_tokens_server"] = res["ours"][0].get("prompt_tokens")
        summary["cases"][case["name"]] = row
    return summary


# ------------------------------------------------------------------------------------------------ media
def media_section(repeats):
    media_dir = os.path.join(BENCH_DIR, "media")
    tiny = os.path.join(ROOT, "tests", "fixtures", "tiny-gemma3n")
    if not os.path.exists(os.path.join(media_dir, "photo_1280x960.jpg")):
        prepare_cases(tiny, [32])
    images = [os.path.join(media_dir, "photo_1280x960.jpg"),
              os.path.join(ROOT, "tests", "fixtures", "media", "formula_320x240.png")]
    audio = [os.path.join(media_dir, "speech_like_10s.wav"), os.path.join(media_dir, "speech_like_30s.wav")]
    a = sum((["--image", p] for p in images), []) + sum((["--audio", p] for p in audio), [])
    log("== media: benches/media.rs")
    media_bin = arg("--media-bin")  # a prebuilt `cargo bench --no-run --bench media` executable
    cmd = [os.path.abspath(media_bin)] if media_bin else ["cargo", "bench", "-q", "--bench", "media", "--"]
    r = subprocess.run(cmd + ["--model-dir", tiny, "--repeats", str(repeats), *a], cwd=ROOT, check=True,
                       capture_output=True, text=True)
    ours = json.loads(r.stdout.strip().splitlines()[-1])
    log("== media: transformers processor")
    r = subprocess.run([FIXTURES_PY, os.path.join(ROOT, "tools", "bench", "ref_media.py"), "--model-dir", tiny,
                        "--repeats", str(repeats), *a], check=True, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                                PYTHONWARNINGS="ignore"))
    ref = json.loads(r.stdout.strip().splitlines()[-1])
    return {"ours": ours, "ref": ref}


# ------------------------------------------------------------------------------------------------ nats
def nats_section(tiny_dir, threads, n):
    nats = NatsServer()
    fport, sport = free_port(), free_port()
    procs = [Proc("nats-frontend", [BIN, "frontend", "--nats-url", nats.url, "--host", "127.0.0.1", "--port",
                                    str(fport)]),
             Proc("nats-worker", [BIN, "worker", "--model", tiny_dir, "--threads", str(threads), "--nats-url",
                                  nats.url]),
             Proc("inproc-serve", [BIN, "serve", "--model", tiny_dir, "--threads", str(threads), "--host",
                                   "127.0.0.1", "--port", str(sport)])]
    try:
        wait_ready(fport, procs, workers=1)
        wait_ready(sport, procs)
        name = served_name(sport)
        req = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
        conns = {k: http.client.HTTPConnection("127.0.0.1", p, timeout=60) for k, p in
                 (("nats", fport), ("inproc", sport))}
        lat = {"nats": [], "inproc": []}
        for i in range(20):
            for k in conns:
                chat(conns[k], req)
        log(f"== nats: {n} 1-token requests each, interleaved")
        for i in range(n):
            for k in (("nats", "inproc") if i % 2 == 0 else ("inproc", "nats")):
                lat[k].append(chat(conns[k], req)[0] * 1e3)
        out = {k: {"p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99), "n": len(v)} for k, v in lat.items()}
        return out
    finally:
        for p in procs:
            p.stop()
        nats.stop()


# ------------------------------------------------------------------------------------------------ throughput
def throughput_section(model_dir, quant, threads, clients, tokens, lengths):
    cases, _ = prepare_cases(model_dir, lengths)
    case = next(c for c in cases if not c["image"])
    out = {}
    for workers in (1, 2):
        wt = max(1, threads // workers)
        nats = NatsServer()
        fport = free_port()
        procs = [Proc("tp-frontend", [BIN, "frontend", "--nats-url", nats.url, "--host", "127.0.0.1", "--port",
                                      str(fport)])]
        for w in range(workers):
            procs.append(Proc(f"tp-worker{w}", [BIN, "worker", "--model", model_dir, "--quant", quant,
                                                "--threads", str(wt), "--nats-url", nats.url,
                                                "--max-concurrent", "8"]))
        try:
            wait_ready(fport, procs, workers=workers)
            name = served_name(fport)
            req = {"model": name, "messages": case["messages"], "max_tokens": tokens, "temperature": 0}
            warm = http.client.HTTPConnection("127.0.0.1", fport, timeout=900)
            for _ in range(workers * 2):
                chat(warm, dict(req, max_tokens=2))
            for c in clients:
                per_client = 2
                done_tokens, lats = [], []

                def client():
                    conn = http.client.HTTPConnection("127.0.0.1", fport, timeout=900)
                    for _ in range(per_client):
                        dt, r = chat(conn, req)
                        done_tokens.append(r["usage"]["completion_tokens"])
                        lats.append(dt)

                t = time.perf_counter()
                ths = [threading.Thread(target=client) for _ in range(c)]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
                wall = time.perf_counter() - t
                out[f"{workers}w/{c}c"] = {"workers": workers, "worker_threads": wt, "clients": c,
                                          "tokens": sum(done_tokens), "wall_s": wall,
                                          "tok_s": sum(done_tokens) / wall, "p50_latency_s": pct(lats, 0.5)}
                log(f"   {workers} worker(s) x {wt} thread(s), {c} clients: {sum(done_tokens) / wall:.2f} tok/s")
        finally:
            for p in procs:
                p.stop()
            nats.stop()
    return out


# ------------------------------------------------------------------------------------------------ table
def fmt(x, d=1):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return f"{x:,.{d}f}"


def ratio(a, b, d=2):
    return f"{a / b:.{d}f}×" if a and b else "—"


def table(results, cores, threads):
    rows = [("section", "case", "metric", "onnx-chat", "reference", "ours/ref")]
    for g in results.get("gen", []):
        tag = f"{g['model']} {g['quant']}"
        for cname, c in g["cases"].items():
            o, r = c["ours"], c["ref"]
            case = f"{cname} ({c['prompt_tokens']} tok)"
            rows.append((tag, case, "time to first token, ms (lower is better)", fmt(o["ttft_ms"], 0),
                         fmt(r["ttft_ms"], 0), ratio(o["ttft_ms"], r["ttft_ms"])))
            rows.append((tag, case, "prefill tokens/s (engine)", fmt(o.get("prefill_tps")), fmt(r.get("prefill_tps")),
                         ratio(o.get("prefill_tps"), r.get("prefill_tps"))))
            rows.append((tag, case, "decode tokens/s", fmt(o["decode_tps"], 2), fmt(r["decode_tps"], 2),
                         ratio(o["decode_tps"], r["decode_tps"])))
            share = lambda x: None if x.get("outside_share") is None else \
                f"{100 * x['outside_share']:.2f}% ({x['outside_us_per_step']:.0f} µs)"
            rows.append((tag, case, "decode step outside Session::run (µs/step)", fmt(share(o)), fmt(share(r)), ""))
            rows.append((tag, case, "generated tokens; first ids equal", f"{fmt(o['tokens'], 0)}",
                         f"{fmt(r['tokens'], 0)}", f"{c['same_ids']} equal"))
        rows.append((tag, "all", f"peak RSS, MB (graphs {g['graph_mb']:,.0f} MB)", fmt(g["peak_rss_mb"]["ours"], 0),
                     fmt(g["peak_rss_mb"]["ref"], 0), ratio(g["peak_rss_mb"]["ours"], g["peak_rss_mb"]["ref"])))
    m = results.get("media")
    if m:
        for path, o in m["ours"]["images"].items():
            rf = m["ref"]["images"][path]
            name = os.path.basename(path)
            for backend, r in rf.items():
                rows.append(("media", f"image {name}", f"decode+resize+tensor, ms (ref: {backend} "
                             f"{m['ref']['classes'][backend]})", fmt(o["median_ms"], 2), fmt(r["median_ms"], 2),
                             ratio(o["median_ms"], r["median_ms"], 3)))
        for path, o in m["ours"]["audio"].items():
            r = m["ref"]["audio"][path]
            name = os.path.basename(path)
            secs = r["seconds"]
            rows.append(("media", f"audio {name} ({secs:.0f} s)", "decode+mel per clip, ms", fmt(o["median_ms"], 2),
                         fmt(r["median_ms"], 2), ratio(o["median_ms"], r["median_ms"], 3)))
            rows.append(("media", f"audio {name}", "mel per second of audio, ms", fmt(o["median_ms"] / secs, 3),
                         fmt(r["median_ms"] / secs, 3), ratio(o["median_ms"], r["median_ms"], 3)))
    n = results.get("nats")
    if n:
        for q in ("p50", "p99"):
            a, b = n["nats"][f"{q}_ms"], n["inproc"][f"{q}_ms"]
            rows.append(("bus", f"1-token request, tiny model, n={n['nats']['n']}",
                         f"{q} latency, ms: NATS (frontend+worker) vs in-process; added {a - b:+.2f} ms",
                         fmt(a, 2), fmt(b, 2), ratio(a, b)))
    t = results.get("throughput")
    if t:
        clients = sorted({v["clients"] for v in t.values()})
        for c in clients:
            one, two = t.get(f"1w/{c}c"), t.get(f"2w/{c}c")
            if one and two:
                rows.append(("throughput", f"{c} concurrent clients",
                             f"tokens/s: 2 workers×{two['worker_threads']} thr vs 1 worker×{one['worker_threads']} thr",
                             fmt(two["tok_s"], 2), fmt(one["tok_s"], 2), ratio(two["tok_s"], one["tok_s"])))
    if any(k in results for k in ("cache", "routing", "gap", "batch", "divergence")):
        import engine_bench
        engine_bench.B = sys.modules[__name__]
        rows.extend(engine_bench.rows(results))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [f"onnx-chat bench — {cores} cores, ORT threads {threads}; medians; ratios ours/ref "
             "(throughput rows: 2 workers / 1 worker; reference column = 1 worker)"]
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main():
    if "--table" in sys.argv:  # re-print a saved run
        res = json.load(open(arg("--table")))
        print(table(res, res["cores"], res["threads"]))
        if res.get("peer"):
            import peer
            print()
            print(peer.table(res["peer"]))
        return
    cores = os.cpu_count()
    model = os.path.abspath(arg("--model", os.path.join(ROOT, "target", "bench-model", "bench-gemma3n")))
    tiny = os.path.abspath(arg("--tiny", os.path.join(ROOT, "tests", "fixtures", "tiny-gemma3n")))
    quants = [q for q in arg("--quants", "Q4_MIXED,QUANTIZED").split(",") if q]
    tiny_quants = [q for q in arg("--tiny-quants", "Q4_MIXED").split(",") if q]
    repeats = int(arg("--repeats", "3"))
    new_tokens = int(arg("--new-tokens", "128"))
    threads = int(arg("--threads", str(cores)))
    lengths = [int(x) for x in arg("--lengths", "32,512").split(",")]
    sections = arg("--sections", "gen,media,nats,throughput,cache,routing,gap,batch,divergence").split(",")
    out_path = arg("--out", os.path.join(BENCH_DIR, "results.json"))
    os.makedirs(BENCH_DIR, exist_ok=True)
    global BIN
    BIN = os.path.abspath(arg("--bin", BIN))
    SERVER_ENV.update(kv.split("=", 1) for kv in (arg("--server-env") or "").split(",") if "=" in kv)
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing: cargo build --release")
    shim = build_shim()
    results = {"cores": cores, "threads": threads, "repeats": repeats, "new_tokens": new_tokens,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
    t0 = time.time()
    if "gen" in sections:
        results["gen"] = []
        for q in tiny_quants:
            results["gen"].append(gen_section(tiny, q, threads, repeats, new_tokens, lengths, shim))
        if os.path.exists(os.path.join(model, "onnx")):
            for q in quants:
                results["gen"].append(gen_section(model, q, threads, repeats, new_tokens, lengths, shim))
        else:
            log(f"!! {model} missing (make bench-model): bench-model rows skipped")
    if "media" in sections:
        results["media"] = media_section(20)
    if "nats" in sections:
        results["nats"] = nats_section(tiny, threads, int(arg("--nats-requests", "300")))
    if "throughput" in sections and os.path.exists(os.path.join(model, "onnx")):
        clients = [int(x) for x in arg("--tp-clients", "1,2,4,8").split(",")]
        results["throughput"] = throughput_section(model, quants[0] if quants else "Q4_MIXED", threads, clients,
                                                   int(arg("--tp-tokens", "32")), lengths)
    if "--engine-on-tiny" in sys.argv:
        engine_model = tiny
    else:
        engine_model = model if os.path.exists(os.path.join(model, "onnx")) else None
    if engine_model and any(x in sections for x in ("cache", "routing", "gap", "batch", "divergence")):
        import engine_bench
        engine_bench.B = sys.modules[__name__]
        eq = quants[0] if engine_model == model and quants else "Q4_MIXED"
        conv = int(arg("--conv", "2"))
        turn_words = int(arg("--turn-words", "60"))  # ~300 tokens a turn with the bench tokenizer
        long_words = int(arg("--long-words", "380"))  # ~2 000 tokens
        results["engine_model"] = f"{os.path.basename(engine_model)} {eq}"
        if "cache" in sections:
            results["cache"] = engine_bench.cache_section(engine_model, eq, threads, conv,
                                                          words_per_turn=turn_words)
        if "routing" in sections:
            results["routing"] = engine_bench.routing_section(engine_model, eq, threads, conv,
                                                              words_per_turn=turn_words)
        if "gap" in sections:
            chunks = [int(x) for x in arg("--chunks", "128,256,512,1024,0").split(",")]
            results["gap"] = engine_bench.gap_section(engine_model, eq, threads, chunks, shim,
                                                      long_words=long_words)
        if "batch" in sections:
            streams = [int(x) for x in arg("--streams", "1,2,4,8").split(",")]
            results["batch"] = engine_bench.batch_section(engine_model, eq, threads, streams,
                                                          int(arg("--batch-tokens", "48")),
                                                          int(arg("--batch-reps", "2")))
        if "divergence" in sections:
            results["divergence"] = engine_bench.divergence_section(engine_model, threads,
                                                                    int(arg("--positions", "2048")))
    if "peer" in sections and os.path.exists(os.path.join(model, "onnx")):
        import peer
        peer.B = peer.E.B = sys.modules[__name__]
        results["peer"] = peer.run(model, quants[0] if quants else "Q4_MIXED", threads, int(arg("--peer-repeats", "2")),
                                   [int(x) for x in arg("--contexts", "32,300,2000,8000").split(",") if x],
                                   [int(x) for x in arg("--streams", "1,4,8").split(",") if x],
                                   int(arg("--peer-tokens", "64")), arg("--llama", "auto").split(","),
                                   long_repeats=int(arg("--long-repeats", "1")))
    results["seconds"] = round(time.time() - t0)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    print(table(results, cores, threads))
    if results.get("peer"):
        import peer
        print()
        print(peer.table(results["peer"]))
    log(f"(results: {out_path}; {results['seconds']} s)")


if __name__ == "__main__":
    main()
