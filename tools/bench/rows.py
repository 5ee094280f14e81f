"""Does a row's result depend on the rows computed with it? ONNX Runtime's MatMulNBits (4-bit weights,
block 32, K = N = 2048) at accuracy levels 0 and 4: each row of A[:M] against the same row computed with
M = 128, for M = 1 .. 256, and rows 5..69 computed at another offset. The README's prefix-cache
exactness rule (never recompute a single row) comes from this: only M = 1 differs.

    .venv/bin/python tools/bench/rows.py [intra-op threads]
"""
import numpy as np, onnx, onnxruntime as ort, sys
from onnx import helper, TensorProto, numpy_helper
K, N, B = 2048, 2048, 32
rng = np.random.default_rng(0)
W = rng.integers(0, 256, size=(N, K // B, B // 2), dtype=np.uint8)
S = (rng.random(N * K // B, dtype=np.float32) * 0.02).astype(np.float32)
def model(level):
    node = helper.make_node("MatMulNBits", ["A", "W", "S"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=B, accuracy_level=level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(S, "S")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    o = ort.SessionOptions(); o.intra_op_num_threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
A = rng.standard_normal((256, K), dtype=np.float32)
for level in (0, 4):
    s = model(level)
    ref = s.run(None, {"A": A[:128]})[0]
    diff_by_m = {}
    for M in list(range(1, 40)) + [63, 64, 65, 100, 127, 128, 200, 256]:
        # the rows 0..M of A, compared with the same rows computed with M=128 (row-wise)
        y = s.run(None, {"A": A[:M]})[0]
        rows = min(M, 128)
        d = np.abs(y[:rows] - ref[:rows]).max()
        diff_by_m[M] = d
    # also: does a row depend on its position inside the block? rows 5..M shifted
    y1 = s.run(None, {"A": A[5:69]})[0]
    shift = np.abs(y1 - ref[5:69]).max()
    print(f"level {level}: max |row(M) - row(M=128)| by M:", {m: float(f"{d:.2e}") for m, d in diff_by_m.items()}, "shifted rows:", f"{shift:.2e}")
