"""Re-save ONNX graphs with their weights as external data, the way large exports are published.

    externalize.py DIR GRAPH [GRAPH ...]

Each GRAPH (a path relative to DIR, e.g. onnx/decoder_model_merged.onnx) is loaded with its data and
saved in place by ONNX's own `save_model(save_as_external_data=True)`: one `<graph>.onnx_data` file
beside it holding every tensor of 1 KiB or more (ONNX's default threshold), as the onnx-community
exports do for graphs over 2 GB. Prints {"GRAPH": {"tensors": N, "data_bytes": B}} as JSON.
"""

import json
import os
import sys

import onnx


def main() -> None:
    root, graphs = sys.argv[1], sys.argv[2:]
    out = {}
    for rel in graphs:
        path = os.path.join(root, rel)
        model = onnx.load(path, load_external_data=True)
        data = os.path.basename(path) + "_data"
        if os.path.exists(os.path.join(os.path.dirname(path), data)):
            os.remove(os.path.join(os.path.dirname(path), data))
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data,
            size_threshold=1024,
        )
        external = [
            t for t in onnx.load(path, load_external_data=False).graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL
        ]
        if not external:
            sys.exit(f"{rel}: no tensor moved to external data")
        out[rel] = {
            "tensors": len(external),
            "data_bytes": os.path.getsize(os.path.join(os.path.dirname(path), data)),
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
