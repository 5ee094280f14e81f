"""Accuracy cost of a graph rewrite (e.g. accuracy_level=4), measured on the committed goldens (tools/fixtures/.venv).

usage: python accuracy_check.py REWRITTEN_MODEL_DIR [--fixtures tests/fixtures] [--quants Q4_MIXED,Q4]

For every golden case and quantization, runs the goldens' own loop (tools/fixtures/ort_loop.py) on the committed
graphs and on the rewritten ones, and prints one JSON line per case:
  same_as_golden      leading generated ids equal to the committed golden of that quantization (of max_new)
  dlogit_rewrite      max |logit| difference, rewritten vs committed graphs, over the steps both share
  dlogit_quant        max |logit| difference, committed quantized graphs vs the FP32 graphs (first step), i.e.
                      the error the quantization itself already has, for scale
  margin              the golden's smallest top-1/top-2 logit gap (how close the greedy choice is to a tie)
"""
import json
import os
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
import ort_loop  # noqa: E402


def arg(flag, default=None):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def feeds(case_dir, exp):
    out = {}
    for m in exp["media"]:
        if m["kind"] == "image":
            px = np.asarray(Image.open(os.path.join(case_dir, m["pixel_values"])), np.float32).transpose(2, 0, 1) / 255
            out.setdefault("pixel_values", []).append(px)
        else:
            feats = np.load(os.path.join(case_dir, m["input_features"]))
            mask = np.load(os.path.join(case_dir, m["input_features_mask"]))
            out["input_features"] = feats[None] if feats.ndim == 2 else feats   # [1, frames, mel]
            out["input_features_mask"] = mask[None] if mask.ndim == 1 else mask  # [1, frames]
    if "pixel_values" in out:
        out["pixel_values"] = np.stack(out["pixel_values"])
    return out


def main():
    new_dir = os.path.join(sys.argv[1], "onnx")
    fx = arg("--fixtures", "tests/fixtures")
    old_dir = os.path.join(fx, "tiny-gemma3n", "onnx")
    quants = arg("--quants", "Q4_MIXED,Q4").split(",")
    index = json.load(open(os.path.join(fx, "goldens", "index.json")))
    eos = set(index["eos_token_ids"])
    cfg = json.load(open(os.path.join(fx, "tiny-gemma3n", "config.json")))
    for case in index["cases"]:
        name = case["case"]
        case_dir = os.path.join(fx, "goldens", name)
        exp = json.load(open(os.path.join(case_dir, "expected.json")))
        f = feeds(case_dir, exp)
        kw = dict(image_token_id=cfg["image_token_id"], audio_token_id=cfg["audio_token_id"], **f)
        n = exp["max_new_tokens"]
        _, fp32_logits = ort_loop.generate(ort_loop.Sessions(old_dir, ort_loop.QUANTS["FP32"]), exp["prompt_ids"],
                                           1, eos, **kw)
        for q in quants:
            old_ids, old_logits = ort_loop.generate(ort_loop.Sessions(old_dir, ort_loop.QUANTS[q]), exp["prompt_ids"],
                                                    n, eos, **kw)
            new_ids, new_logits = ort_loop.generate(ort_loop.Sessions(new_dir, ort_loop.QUANTS[q]), exp["prompt_ids"],
                                                    n, eos, **kw)
            gold = exp["generated"][q]["ids"]
            same = next((i for i, (a, b) in enumerate(zip(new_ids, gold)) if a != b), min(len(new_ids), len(gold)))
            shared = next((i for i, (a, b) in enumerate(zip(new_ids, old_ids)) if a != b),
                          min(len(new_ids), len(old_ids)))
            k = min(shared + 1, len(new_logits), len(old_logits))
            print(json.dumps({
                "case": name, "quant": q, "same_as_golden": same, "of": len(gold),
                "committed_graphs_same_as_golden": old_ids == gold,
                "dlogit_rewrite": round(float(np.abs(new_logits[:k] - old_logits[:k]).max()), 4),
                "dlogit_quant": round(float(np.abs(old_logits[0] - fp32_logits[0]).max()), 4),
                "margin": round(exp["generated"][q]["min_margin"], 4),
            }), flush=True)


if __name__ == "__main__":
    main()
