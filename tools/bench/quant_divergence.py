"""Numerical cost and speed of each quantization set (and MatMulNBits accuracy level) against the fp32 graphs:
the `divergence` section of `make bench` (tools/fixtures/.venv: onnx, onnxruntime, tokenizers).

usage: python quant_divergence.py MODEL_DIR [--positions 2048] [--chunk 256] [--threads N]
                                  [--variants FP16,QUANTIZED,Q4_MIXED@0,Q4_MIXED@4,Q4@0,Q4@4]

Text: the repository's own prose (README.md, BENCHMARKS.md, docs, model_interface notes), tokenized with the
model's tokenizer, cut into --chunk-position sequences (each starting with <bos>) until --positions positions.
For every sequence, embed_tokens + decoder_model_merged of each variant run the whole sequence in one prefill
with full logits; at every position the next-token distribution p (fp32 graphs) is compared with q (variant):
  kl_mean      mean over positions of KL(p || q) in nats (softmax of the logits, after soft-capping where the
               graph does not cap: the same rule as the server)
  top1         share of positions whose argmax agrees with fp32's
  decode_ms    median decoder step (one new token after a 256-position past), in onnxruntime, same threads
Variants: QUANT (files as exported) or QUANT@LEVEL (accuracy_level=LEVEL written on every MatMulNBits node of
the set's graphs, as the server's load-time rewrite does; @0 = as exported).
Prints one JSON object (variant -> metrics) on stdout.
"""
import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
sys.path.insert(0, HERE)
import ort_loop  # noqa: E402
import rewrite_graph  # noqa: E402  (set_accuracy_level, this directory)


def arg(flag, default=None):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def text_ids(tok, bos, positions, chunk):
    paths = ["README.md", "BENCHMARKS.md", "tests/fixtures/README.md"]
    paths += [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
              if f.endswith(".md")] if os.path.isdir(os.path.join(ROOT, "docs")) else []
    ids = []
    for p in paths:
        full = os.path.join(ROOT, p)
        if os.path.exists(full):
            ids += tok.encode(open(full, encoding="utf-8").read(), add_special_tokens=False).ids
    seqs = []
    for k in range(0, len(ids), chunk - 1):
        if sum(len(s) for s in seqs) >= positions:
            break
        part = ids[k:k + chunk - 1]
        if len(part) == chunk - 1:
            seqs.append([bos] + part)
    return seqs


def with_level(path, level, made):
    """A copy of the graph at `path` with accuracy_level=level on every MatMulNBits node, written beside it
    (so relative external-data locations still resolve) and listed in `made` for removal."""
    m = onnx.load(path, load_external_data=False)
    if rewrite_graph.set_accuracy_level(m, level) == 0:
        return path
    out = os.path.join(os.path.dirname(path), f".level{level}-{os.path.basename(path)}")
    if out not in made:
        onnx.save(m, out)
        made.append(out)
    return out


class Variant:
    def __init__(self, onnx_dir, spec, threads, tmp):
        quant, _, level = spec.partition("@")
        files = ort_loop.QUANTS[quant]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3

        def load(comp):
            p = os.path.join(onnx_dir, f"{comp}{files[comp]}.onnx")
            if level and int(level) > 0:
                p = with_level(p, int(level), tmp)
            return ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])

        self.embed = load("embed_tokens")
        self.dec = load("decoder_model_merged")
        self.names = [o.name for o in self.dec.get_outputs()]

    def run(self, ids, past=None):
        e, p = self.embed.run(None, ort_loop.feed(self.embed, {"input_ids": np.array([ids], np.int64)}))
        start = 0 if past is None else next(iter(past.values())).shape[2]
        feeds = {"inputs_embeds": e, "per_layer_inputs": p,
                 "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None]}
        feeds.update(past if past is not None else ort_loop.empty_past(self.dec))
        out = self.dec.run(None, ort_loop.feed(self.dec, feeds))
        logits = out[0][0].astype(np.float32)
        present = {n.replace("present", "past_key_values"): v for n, v in zip(self.names[1:], out[1:])}
        return logits, present


def log_softmax(x, cap):
    if cap and np.abs(x).max() > cap * 1.0001:
        x = np.tanh(x / cap) * cap
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main():
    model_dir = sys.argv[1]
    positions = int(arg("--positions", "2048"))
    chunk = int(arg("--chunk", "256"))
    threads = int(arg("--threads", str(os.cpu_count())))
    variants = arg("--variants", "FP16,QUANTIZED,Q4_MIXED@0,Q4_MIXED@4,Q4@0,Q4@4").split(",")
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    text_cfg = cfg.get("text_config", cfg)
    cap = text_cfg.get("final_logit_softcapping")
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    seqs = text_ids(tok, text_cfg.get("bos_token_id", 2), positions, chunk)
    onnx_dir = os.path.join(model_dir, "onnx")
    have = set(os.listdir(onnx_dir))
    variants = [v for v in variants
                if all(f"{c}{s}.onnx" in have for c, s in ort_loop.QUANTS[v.split("@")[0]].items()
                       if c in ("embed_tokens", "decoder_model_merged"))]
    out = {}
    tmp = []
    try:
        ref = Variant(onnx_dir, "FP32", threads, tmp)
        ref_lp = [log_softmax(ref.run(s)[0], cap) for s in seqs]
        past = ref.run(seqs[0])[1]
        del ref
        for spec in ["FP32"] + variants:
            v = Variant(onnx_dir, spec, threads, tmp)
            kls, agree, n = 0.0, 0, 0
            for s, lp in zip(seqs, ref_lp):
                lq = log_softmax(v.run(s)[0], cap)
                p = np.exp(lp)
                kls += float((p * (lp - lq)).sum())
                agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
                n += lp.shape[0]
            _, vpast = v.run(seqs[0])
            steps = []
            for k in range(12):
                t = time.perf_counter()
                v.run([seqs[0][k + 1]], vpast)
                steps.append((time.perf_counter() - t) * 1e3)
            out[spec] = {"positions": n, "kl_mean": kls / n, "top1": agree / n,
                         "decode_ms": float(np.median(steps[2:]))}
            print(f"   {spec}: KL {kls / n:.5f} nats, top-1 {100 * agree / n:.2f}%, "
                  f"step {out[spec]['decode_ms']:.1f} ms", file=sys.stderr, flush=True)
            del v
        del past
    finally:
        for f in tmp:
            if os.path.exists(f):
                os.remove(f)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
