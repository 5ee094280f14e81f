"""One attention node timed alone: ONNX Runtime 1.31's GroupQueryAttention against onnx-chat's own
onnx_chat.CachedAttention (src/engine/attention.rs), Gemma-3n E2B's shapes (8 query heads over 2 KV heads of
256), the KV cache bound in place (capacity 9 216 positions) as the server binds it, past lengths 32, 512,
2 000 and 8 000; a decode step (1 new position) and a prefill chunk (512). Medians of 61 runs (7 for
chunks), the two kernels alternating.

usage: .venv/bin/python tools/bench/attention_kernel.py [--threads 2]
(builds examples/attention_kernel.rs with cargo --release; graphs under target/bench/attention/)
"""
import os
import subprocess
import sys

import onnx
from onnx import TensorProto as T
from onnx import helper

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "target", "bench", "attention")
HEADS, KV_HEADS, HEAD = 8, 2, 256


def graph(op, domain):
    f, i = T.FLOAT, T.INT32
    inputs = [helper.make_tensor_value_info("q", f, ["b", "s", HEADS * HEAD]),
              helper.make_tensor_value_info("k", f, ["b", "s", KV_HEADS * HEAD]),
              helper.make_tensor_value_info("v", f, ["b", "s", KV_HEADS * HEAD]),
              helper.make_tensor_value_info("pk", f, ["b", KV_HEADS, "c", HEAD]),
              helper.make_tensor_value_info("pv", f, ["b", KV_HEADS, "c", HEAD]),
              helper.make_tensor_value_info("sl", i, ["b"]),
              helper.make_tensor_value_info("tot", i, [])]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("o", "prk", "prv")]
    node = helper.make_node(op, [x.name for x in inputs], ["o", "prk", "prv"], domain=domain,
                            num_heads=HEADS, kv_num_heads=KV_HEADS, scale=1.0)
    return helper.make_model(helper.make_graph([node], "attention", inputs, outputs), ir_version=9,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])


def main():
    threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "2"
    os.makedirs(OUT, exist_ok=True)
    onnx.save(graph("GroupQueryAttention", "com.microsoft"), os.path.join(OUT, "gqa.onnx"))
    onnx.save(graph("CachedAttention", "onnx_chat"), os.path.join(OUT, "onnx-chat.onnx"))
    subprocess.run(["cargo", "build", "--release", "--example", "attention_kernel"], cwd=ROOT, check=True)
    exe = os.path.join(ROOT, "target", "release", "examples", "attention_kernel")
    for seq in ("1", "512"):
        subprocess.run([exe, OUT, seq, threads], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
