"""`make bench-peer`: onnx-chat side by side with llama.cpp's llama-server on the bench model, over HTTP.

usage: .venv/bin/python tools/bench/peer.py [--model DIR] [--quant Q4_MIXED] [--threads N] [--repeats 2]
           [--long-repeats 1] [--contexts 32,300,2000,8000] [--streams 1,4,8] [--new-tokens 64]
           [--llama auto | none | Q4_K_M,Q4_0:no-repack,...] [--ours auto[,unfused,auto:ort]] [--probe-only]
           [--out target/bench/peer.json]
       .venv/bin/python tools/bench/peer.py --table target/bench/peer.json      (re-print a saved run)

Needs tools/bench/peer_setup.sh (llama.cpp built from a pinned source release, the bench model as GGUF) and
target/release/onnx-chat. Both servers run at the same time, each with --threads N (llama-server: -t/-tb N),
and are timed in turn over HTTP, streaming, on the same requests:

- every request is fresh: a unique tag is the first text of the prompt (no prefix cache can reuse another
  request's prompt), and llama-server also gets "cache_prompt": false and runs with --cache-ram 0;
- "ignore_eos": true on both, so every request generates --new-tokens tokens;
- order alternates per repeat (A, B, C, then C, B, A, ...), medians over --repeats (--long-repeats for prompts of
  4 000 tokens and more: one 8 000-token request takes 3.5-4 minutes per server on 2 cores);
- one request per (context, repeat): a prompt of ~P tokens (the bench tokenizer; the GGUF has the same
  vocabulary as a SentencePiece model, and both servers' prompt token counts are reported) gives the time to first
  token (send -> first streamed token) and the decode rate (tokens after the first / time from the first to the
  last token), i.e. decode with ~P tokens of context;
- --streams: n concurrent streams of short (~40-token) prompts, aggregate tokens/s over the window in which all n
  are decoding (engine_bench.stream_stats).

--ours: onnx-chat's --attention values to run side by side (auto: fused attention, the default; unfused: the
decoder's attention as exported, which copies the whole KV cache every step: the before of issue 26), each
optionally with :KERNEL for --attention-kernel (auto:ort = fused into ONNX Runtime's GroupQueryAttention instead
of onnx-chat's own kernel).

Token arrival times: our server streams token ids (return_token_ids); llama-server streams text, so it gets
"timings_per_token": true and each chunk's timings.predicted_n counts the tokens generated so far (a chunk can
carry several tokens when a token's text is an incomplete UTF-8 sequence or empty). llama-server's own
prompt/decode timings are kept in the JSON for comparison.

llama.cpp configurations (--llama): QUANT[:no-repack], the GGUF target/peer/gguf/bench-gemma3n-QUANT.gguf;
":no-repack" adds --no-repack (weights kept in the GGUF layout instead of the CPU backend's repacked,
interleaved layout). "auto" (default) first probes Q4_K_M and Q4_0, each with and without repacking (a 300- and
a 600-token prompt, i.e. two prompt batches of 512, and 4 concurrent streams; a crash or an HTTP error marks the
configuration broken), then
benches, per quantization, the first one that works, repacked first (llama.cpp's default).
"""
import http.client
import json
import os
import subprocess
import sys
import threading
import time

import bench as B
import engine_bench as E

E.B = B
PEER = os.path.join(B.ROOT, "target", "peer")
LLAMA_SERVER = os.path.join(PEER, "build", "bin", "llama-server")
GGUF_DIR = os.path.join(PEER, "gguf")
LLAMA_CTX = 16384          # shared (--kv-unified) by the slots: one 8 000-token conversation fits with room to spare
LLAMA_SLOTS = 8
RUN_ID = f"{os.getpid() % 10000}"
_uid = [0]


def tag():
    _uid[0] += 1
    return f"Request {RUN_ID}-{_uid[0]}."


# ------------------------------------------------------------------------------------------------ prompts
def calibrate(model_dir, targets):
    """Words per prompt so that the rendered prompt is ~target tokens with the bench tokenizer (fixtures venv)."""
    code = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from engine_bench import words
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
out = {}
for target in json.loads(sys.argv[3]):
    body = lambda n: "Request 0000-000. Read this and answer briefly: " + words(n, target)
    count = lambda n: len(tok.encode(body(n), add_special_tokens=False).ids) + 10  # + the chat template's tokens
    lo, hi = 1, 2
    while count(hi) < target:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    out[target] = lo
print(json.dumps(out))
"""
    r = subprocess.run([B.FIXTURES_PY, "-c", code, os.path.join(B.ROOT, "tools", "bench"),
                        os.path.join(model_dir, "tokenizer.json"), json.dumps(targets)],
                       capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(r.stdout).items()}


def prompt(target, nwords):
    return f"{tag()} Read this and answer briefly: {E.words(nwords, target)}"


# ------------------------------------------------------------------------------------------------ servers
class Server:
    def __init__(self, key, label, argv, kind, env=None):
        self.key, self.label, self.kind = key, label, kind
        self.port = B.free_port()
        self.argv = argv + ["--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = B.Proc(f"peer-{key.replace(':', '-')}", self.argv, env=env)
        self.name = "bench"

    def alive(self):
        return self.proc.p.poll() is None

    def wait(self, timeout=900):
        t = time.time()
        path = "/ready" if self.kind == "ours" else "/health"
        while time.time() - t < timeout:
            if not self.alive():
                return False
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", path)
                r = c.getresponse()
                body = json.loads(r.read() or b"{}")
                if r.status == 200 and body.get("status") in ("ready", "ok"):
                    if self.kind == "ours":
                        self.name = B.served_name(self.port)
                    return True
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        return False

    def log_tail(self, n=1500):
        try:
            return open(self.proc.log_path, errors="replace").read()[-n:]
        except OSError:
            return ""

    def peak_rss_mb(self):
        return B.rss_peak_mb(self.proc.p.pid)

    def stop(self):
        self.proc.stop()


def ours(model_dir, quant, threads, attention="auto"):
    """onnx-chat with --attention ATTENTION (auto: the default, fused; unfused: the graph as exported);
    ATTENTION:KERNEL also passes --attention-kernel KERNEL (onnx-chat: the default; ort: GroupQueryAttention)."""
    attention, _, kernel = attention.partition(":")
    key, label = "ours", f"onnx-chat {quant}"
    argv = [B.BIN, "serve", "--model", model_dir, "--quant", quant, "--threads", str(threads), "--attention", attention]
    if attention != "auto":
        key, label = f"ours:{attention}", f"{label} --attention {attention}"
    if kernel:
        key, label = f"{key}:{kernel}", f"{label} --attention-kernel {kernel}"
        argv += ["--attention-kernel", kernel]
    return Server(key, label, argv, "ours")


def llama(config, threads):
    quant, _, opt = config.partition(":")
    argv = [LLAMA_SERVER, "-m", os.path.join(GGUF_DIR, f"bench-gemma3n-{quant}.gguf"), "-t", str(threads),
            "-tb", str(threads), "-c", str(LLAMA_CTX), "-np", str(LLAMA_SLOTS), "--kv-unified", "--cache-ram", "0",
            "--no-webui", "-a", "bench"]
    label = f"llama.cpp {quant}"
    if opt == "no-repack":
        argv.append("--no-repack")
        label += " --no-repack"
    elif opt:
        sys.exit(f"unknown llama.cpp option {opt!r} in {config!r}")
    return Server(config, label, argv, "llama")


# ------------------------------------------------------------------------------------------------ requests
def stream(server, text, max_tokens):
    """One streaming chat request: send time and [(arrival ns, tokens generated so far)], prompt tokens,
    llama-server's timings."""
    body = {"model": server.name, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if server.kind == "ours":
        body["return_token_ids"] = True
    else:
        body.update(cache_prompt=False, timings_per_token=True)
    events = B.sse_chat(server.port, body, timeout=1800)
    t_send = next(events)
    points, usage, timings, count = [], None, None, 0
    for now, obj in events:
        usage = obj.get("usage") or usage
        if server.kind == "ours":
            for ch in obj.get("choices", []):
                count += len((ch.get("delta") or {}).get("token_ids") or [])
        elif obj.get("timings"):
            timings = obj["timings"]
            count = max(count, int(timings.get("predicted_n") or 0))
        if count and (not points or count > points[-1][1]):
            points.append((now, count))
    return {"t_send": t_send, "points": points, "usage": usage, "timings": timings}


def measure(r):
    pts = r["points"]
    if not pts:
        raise RuntimeError("no tokens streamed")
    t1, n1 = pts[0]
    tl, nl = pts[-1]
    return {"ttft_ms": (t1 - r["t_send"]) / 1e6, "first_chunk_tokens": n1, "tokens": nl,
            "decode_tps": (nl - n1) / ((tl - t1) / 1e9) if tl > t1 else None,
            "prompt_tokens": (r["usage"] or {}).get("prompt_tokens"),
            "server_prompt_ms": (r["timings"] or {}).get("prompt_ms"),
            "server_decode_tps": (r["timings"] or {}).get("predicted_per_second")}


def per_token_times(r):
    out, prev = [], 0
    for t, n in r["points"]:
        out.extend([t] * (n - prev))
        prev = n
    return out


def concurrent(server, n, tokens, nwords):
    res, errs = [None] * n, []

    def one(i):
        try:
            res[i] = stream(server, f"{tag()} Story {i}: {E.words(nwords, 7000 + i)}", tokens)
        except Exception as e:  # noqa: BLE001 (reported, the configuration is marked broken)
            errs.append(repr(e))

    ths = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    if errs:
        raise RuntimeError(errs[0])
    tps, steady, _ = E.stream_stats([per_token_times(r) for r in res])
    return {"tps": tps, "gap_p50_ms": B.pct(steady, 0.5), "tokens": sum(r["points"][-1][1] for r in res)}


# ------------------------------------------------------------------------------------------------ probe
def probe(servers, words_for):
    """Which llama.cpp configurations survive prompt processing and batched decode."""
    status = {}
    for s in servers:
        if not s.wait():
            status[s.key] = f"did not start: {s.log_tail(400)!r}"
            continue
        try:
            for p in (300, 600):
                stream(s, prompt(p, words_for[p]), 4)
                if not s.alive():
                    raise RuntimeError("exited")
            concurrent(s, 4, 8, 30)
            time.sleep(0.5)
            if not s.alive():
                raise RuntimeError("exited")
            status[s.key] = "ok"
        except Exception as e:  # noqa: BLE001
            time.sleep(1)
            rc = s.proc.p.poll()
            tail = [ln for ln in s.log_tail(3000).splitlines() if ln.strip()][-6:]
            status[s.key] = (f"fails: {e!s:.120}" + (f" (exit status {rc})" if rc is not None else "") +
                             " | " + " / ".join(tail)[-600:])
        B.log(f"   probe {s.label}: {status[s.key][:300]}")
    return status


# ------------------------------------------------------------------------------------------------ run
def run(model_dir, quant, threads, repeats, contexts, streams, new_tokens, configs, probe_only=False,
        long_repeats=1, attentions=("auto",)):
    for path in (B.BIN, LLAMA_SERVER):
        if not os.path.exists(path):
            sys.exit(f"{path} missing: `make bench-peer` builds it (cargo build --release; tools/bench/peer_setup.sh)")
    words_for = calibrate(model_dir, sorted(set(contexts) | {32, 300, 600}))
    out = {"threads": threads, "repeats": repeats, "long_repeats": long_repeats, "new_tokens": new_tokens, "contexts": contexts,
           "streams": streams, "llama_ctx": LLAMA_CTX, "llama_slots": LLAMA_SLOTS, "cpu": cpu_name(),
           "llama_version": llama_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    servers = []
    try:
        if configs == ["auto"]:
            cand = ["Q4_K_M", "Q4_K_M:no-repack", "Q4_0", "Q4_0:no-repack"]
            B.log(f"== peer: probing llama.cpp configurations {cand}")
            probing = [llama(c, threads) for c in cand]
            out["probe"] = probe(probing, words_for)
            chosen = []
            for q in ("Q4_K_M", "Q4_0"):
                ok = [c for c in cand if c.split(":")[0] == q and out["probe"][c] == "ok"]
                if ok:
                    chosen.append(ok[0])
            for s in probing:
                if s.key in chosen:
                    s.proc.stop()
                else:
                    s.stop()
            configs = chosen
        if probe_only:
            return out
        servers = [ours(model_dir, quant, threads, a) for a in attentions] + [llama(c, threads) for c in configs]
        for s in servers:
            if not s.wait():
                sys.exit(f"{s.label} did not start:\n{s.log_tail()}")
        out["servers"] = {s.key: s.label for s in servers}
        for s in servers:  # warm-up
            stream(s, prompt(32, words_for.get(32, 10)), 4)
        rows = {s.key: {"ctx": {}, "streams": {}} for s in servers}
        broken = {}
        for p in contexts:
            got = {s.key: [] for s in servers}
            for i in range(repeats if p < 4000 else long_repeats):
                for s in (servers if i % 2 == 0 else servers[::-1]):
                    if s.key in broken:
                        continue
                    try:
                        m = measure(stream(s, prompt(p, words_for[p]), new_tokens))
                    except Exception as e:  # noqa: BLE001
                        broken[s.key] = f"{p}-token prompt: {e!s:.200} | {s.log_tail(600)!r}"
                        B.log(f"!! {s.label}: {broken[s.key]}")
                        continue
                    got[s.key].append(m)
                    B.log(f"   {s.label}: ~{p} tokens (prompt {m['prompt_tokens']}): TTFT {m['ttft_ms']:,.0f} ms, "
                          f"decode {B.fmt(m['decode_tps'], 2)} tok/s")
            for k, v in got.items():
                if v:
                    rows[k]["ctx"][str(p)] = {f: B.median([x[f] for x in v]) for f in v[0]}
        for n in streams:
            got = {s.key: [] for s in servers}
            for i in range(repeats):
                for s in (servers if (i + n) % 2 == 0 else servers[::-1]):
                    if s.key in broken:
                        continue
                    try:
                        m = concurrent(s, n, new_tokens, 30)
                    except Exception as e:  # noqa: BLE001
                        broken[s.key] = f"{n} streams: {e!s:.200} | {s.log_tail(600)!r}"
                        B.log(f"!! {s.label}: {broken[s.key]}")
                        continue
                    got[s.key].append(m)
                    B.log(f"   {s.label}: {n} streams: {B.fmt(m['tps'], 2)} tok/s")
            for k, v in got.items():
                if v:
                    rows[k]["streams"][str(n)] = {f: B.median([x[f] for x in v]) for f in v[0]}
        for s in servers:
            rows[s.key]["peak_rss_mb"] = s.peak_rss_mb()
        out["rows"] = rows
        out["broken"] = broken
        return out
    finally:
        for s in servers:
            s.stop()


def cpu_name():
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def llama_version():
    try:
        r = subprocess.run([LLAMA_SERVER, "--version"], capture_output=True, text=True, timeout=30)
        return " ".join((r.stdout + r.stderr).split())[-120:]
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def table(res):
    lines = [f"peer bench — {res.get('cpu')}, {res['threads']} threads each; llama.cpp: {res.get('llama_version')}; "
             f"{res['new_tokens']} new tokens, medians of {res['repeats']}"
             + (f" ({res['long_repeats']} for prompts of 4 000+ tokens)" if res.get("long_repeats") else "")]
    for k, v in (res.get("probe") or {}).items():
        lines.append(f"  llama.cpp {k}: {v}")
    rows = res.get("rows")
    if not rows:
        return "\n".join(lines)
    keys = list(rows)
    labels = [res["servers"][k] for k in keys]
    lines.append("")
    lines.append("| | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---:|" * len(keys))

    def row(title, get, d):
        lines.append(f"| {title} | " + " | ".join(B.fmt(get(rows[k]), d) for k in keys) + " |")

    ctxs = [str(c) for c in res["contexts"]]
    for c in ctxs:
        row(f"decode tok/s, ~{c} tokens of context", lambda r: (r["ctx"].get(c) or {}).get("decode_tps"), 2)
    for c in ctxs:
        row(f"time to first token, s, ~{c}-token prompt",
            lambda r: None if (r["ctx"].get(c) or {}).get("ttft_ms") is None else r["ctx"][c]["ttft_ms"] / 1e3, 2)
    for c in ctxs:
        row(f"prompt tokens (server's count), ~{c}", lambda r: (r["ctx"].get(c) or {}).get("prompt_tokens"), 0)
    for n in res["streams"]:
        row(f"aggregate decode tok/s, {n} concurrent stream{'s' if n > 1 else ''}",
            lambda r: (r["streams"].get(str(n)) or {}).get("tps"), 2)
    row("peak RSS, MB", lambda r: r.get("peak_rss_mb"), 0)
    for k, v in (res.get("broken") or {}).items():
        lines.append(f"\n{res['servers'][k]} broke: {v[:400]}")
    return "\n".join(lines)


def main():
    if "--table" in sys.argv:
        print(table(json.load(open(B.arg("--table")))))
        return
    model = os.path.abspath(B.arg("--model", os.path.join(B.ROOT, "target", "bench-model", "bench-gemma3n")))
    B.BIN = os.path.abspath(B.arg("--bin", B.BIN))
    threads = int(B.arg("--threads", str(os.cpu_count())))
    res = run(model, B.arg("--quant", "Q4_MIXED"), threads, int(B.arg("--repeats", "2")),
              [int(x) for x in B.arg("--contexts", "32,300,2000,8000").split(",") if x],
              [int(x) for x in B.arg("--streams", "1,4,8").split(",") if x], int(B.arg("--new-tokens", "64")),
              [c for c in B.arg("--llama", "auto").split(",") if c and c != "none"], probe_only="--probe-only" in sys.argv,
              long_repeats=int(B.arg("--long-repeats", "1")),
              attentions=B.arg("--ours", "auto").split(","))
    path = B.arg("--out", os.path.join(B.BENCH_DIR, "peer.json"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    B.log(f"(results: {path})")


if __name__ == "__main__":
    main()
