"""Model load: time to ready and peak memory, from a plain folder and from a Hugging Face cache snapshot.

A user who downloads a model gets hf-hub's cache: every file of `snapshots/<commit>/` a relative link into the
repo's `blobs/`, the fp32 graphs' weights in `.onnx_data` files behind such links. This starts `serve` on the
bench model laid out both ways (the cache made from the bench model's files: blobs are hard links, so it costs no
disk; their names are a digest of the file's name and size, not of its 8 GB of bytes) and measures, per binary,
layout and set, the seconds from spawn to `/ready` and the process's peak resident memory (VmHWM) at that moment;
medians, runs alternated between binaries. With --old-bin, a binary built from an earlier commit runs beside the
new one on the same machine (a run that fails to load is reported with its error).

usage: .venv/bin/python tools/bench/load_bench.py [--bin target/release/onnx-chat] [--old-bin OLD]
           [--model target/bench-model/bench-gemma3n] [--quants FP32,Q4_MIXED] [--repeats 3] [--threads N]
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import bench as B

REPO = "onnx-community/gemma-3n-E2B-it-ONNX"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(model, root):
    """`model`'s files as hf-hub's cache under `root` (HF_HOME): returns the snapshot folder."""
    repo = os.path.join(root, "hub", "models--" + REPO.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for dirpath, _, files in os.walk(model):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, model)
            if rel.startswith(".") or rel == "bench_model.json":
                continue
            blob = hashlib.sha256(f"{rel}:{os.path.getsize(src)}".encode()).hexdigest()
            os.link(src, os.path.join(repo, "blobs", blob))
            dst = os.path.join(snap, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.path.relpath(os.path.join(repo, "blobs", blob), os.path.dirname(dst)), dst)
    return snap


def load_once(binary, name, model_arg, quant, threads, env):
    port = B.free_port()
    t0 = time.time()
    p = B.Proc(name, [binary, "serve", "--model", model_arg, "--quant", quant, "--threads", str(threads),
                      "--host", "127.0.0.1", "--port", str(port)], env=env)
    try:
        while True:
            if p.p.poll() is not None:
                p.log.flush()
                lines = [x for x in open(p.log_path).read().splitlines() if x.strip()]
                last = lines[-1] if lines else f"exit {p.p.returncode}"
                return {"error": last if len(last) <= 300 else last[:300] + " …"}
            try:
                c = B.http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/ready")
                r = c.getresponse()
                body = json.loads(r.read() or b"{}")
                if r.status == 200 and body.get("status") == "ready":
                    return {"seconds": time.time() - t0, "peak_mb": B.rss_peak_mb(p.p.pid)}
            except (OSError, ValueError):
                pass
            if time.time() - t0 > 900:
                return {"error": "not ready after 900 s"}
            time.sleep(0.05)
    finally:
        p.stop()


def main():
    new = os.path.abspath(B.arg("--bin", os.path.join(B.ROOT, "target", "release", "onnx-chat")))
    old = B.arg("--old-bin")
    model = os.path.abspath(B.arg("--model", os.path.join(B.ROOT, "target", "bench-model", "bench-gemma3n")))
    quants = B.arg("--quants", "FP32,Q4_MIXED").split(",")
    repeats = int(B.arg("--repeats", "3"))
    threads = int(B.arg("--threads", str(os.cpu_count())))
    bins = [("new", new)] + ([("old", os.path.abspath(old))] if old else [])
    tmp = tempfile.mkdtemp(prefix="load-bench-", dir=os.path.dirname(model))
    try:
        snap = hub_cache(model, tmp)
        layouts = {
            "folder": (model, {}),
            "hub cache": (REPO, {"HF_HOME": tmp, "HF_HUB_OFFLINE": "1"}),
        }
        res = {}
        for quant in quants:
            for layout, (model_arg, env) in layouts.items():
                for i in range(repeats):
                    order = bins if i % 2 == 0 else bins[::-1]
                    for who, binary in order:
                        r = load_once(binary, f"load-{who}", model_arg, quant, threads, env)
                        B.log(f"{quant:9} {layout:10} {who}: {r}")
                        res.setdefault((quant, layout, who), []).append(r)
        print(f"\nload of {os.path.basename(model)} ({snap} for the cache), {threads} threads, "
              f"median of {repeats}:\n")
        print("| set | layout | binary | to /ready (s) | peak RSS (MB) |")
        print("|---|---|---|---|---|")
        for (quant, layout, who), runs in res.items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                print(f"| {quant} | {layout} | {who} | fails: {runs[0]['error']} | |")
                continue
            print(f"| {quant} | {layout} | {who} | {B.median([r['seconds'] for r in ok]):.1f} | "
                  f"{B.median([r['peak_mb'] for r in ok]):.0f} |")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
