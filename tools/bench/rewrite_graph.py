"""Graph rewrites measured in BENCHMARKS.md (the levers of issue 8), applied to a copy of a model snapshot.

usage: python rewrite_graph.py SRC_MODEL_DIR DST_MODEL_DIR [--accuracy-level N] [--last-logits]
                               [--only decoder_model_merged_q4.onnx,...]

DST_MODEL_DIR mirrors SRC_MODEL_DIR with hard links (copies across file systems; onnxruntime refuses external
data behind a symlink that leaves the model's directory); each rewritten graph is a new .onnx beside links to the
original external-data files (their `location` entries are relative, so they still resolve).

--accuracy-level N  sets accuracy_level=N on every com.microsoft.MatMulNBits node (4 = int8 activations,
                    the path with integer dot products; unset/0 = fp32 compute as exported).
--last-logits       decoder only: slices the lm_head input to the last position (Slice axis 1, [-1:]), so
                    `logits` is [batch, 1, vocab] whatever the prompt length; the slice sits right before the
                    lm_head MatMul/MatMulNBits/MatMulInteger (after DynamicQuantizeLinear for int8 graphs), so
                    the last row's numbers are those of the full computation.
Needs only `onnx` and `numpy` (tools/fixtures/.venv has both).
"""
import os
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

MATMULS = {"MatMul", "MatMulNBits", "MatMulInteger", "Gemm"}


def arg(flag, default=None):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def set_accuracy_level(m, level):
    n = 0
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            for a in list(node.attribute):
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("accuracy_level", level))
            n += 1
    return n


def last_logits(m):
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    name = "logits"
    while True:
        node = prod.get(name)
        if node is None:
            raise SystemExit("no MatMul found above `logits`")
        if node.op_type in MATMULS:
            break
        name = node.input[0]
    a = node.input[0]
    sliced = a + "__last_position"
    consts = {"starts": [-1], "ends": [np.iinfo(np.int64).max], "axes": [1]}
    names = []
    for k, v in consts.items():
        t = numpy_helper.from_array(np.array(v, dtype=np.int64), f"{sliced}_{k}")
        g.initializer.append(t)
        names.append(t.name)
    sl = helper.make_node("Slice", [a] + names, [sliced], name=f"{node.name or 'lm_head'}_last_position")
    node.input[0] = sliced
    idx = list(g.node).index(node)
    g.node.insert(idx, sl)
    for o in g.output:
        if o.name == "logits":
            dims = o.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].ClearField("dim_param")
                dims[1].dim_value = 1
    return node.op_type


def link(s, d):
    try:
        os.link(s, d)
    except OSError:
        import shutil
        shutil.copyfile(s, d)


def main():
    src, dst = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    level = arg("--accuracy-level")
    only = [x for x in (arg("--only") or "").split(",") if x]
    os.makedirs(os.path.join(dst, "onnx"), exist_ok=True)
    for f in os.listdir(src):
        if f != "onnx" and not os.path.exists(os.path.join(dst, f)):
            link(os.path.join(src, f), os.path.join(dst, f))
    for f in sorted(os.listdir(os.path.join(src, "onnx"))):
        s, d = os.path.join(src, "onnx", f), os.path.join(dst, "onnx", f)
        if os.path.lexists(d):
            os.remove(d)
        rewrite = f.endswith(".onnx") and (not only or f in only)
        if not rewrite:
            link(s, d)
            continue
        m = onnx.load(s, load_external_data=False)
        notes = []
        if level is not None:
            k = set_accuracy_level(m, int(level))
            if k:
                notes.append(f"accuracy_level={level} on {k} MatMulNBits")
        if "--last-logits" in sys.argv and f.startswith("decoder_model_merged"):
            notes.append(f"last-position logits (before {last_logits(m)})")
        if notes:
            onnx.save(m, d)
            print(f"{f}: " + "; ".join(notes))
        else:
            link(s, d)


if __name__ == "__main__":
    main()
