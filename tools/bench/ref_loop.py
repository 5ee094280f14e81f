"""The reference: the model card's Python onnxruntime loop (numpy in, numpy out each step), timed.

usage: python ref_loop.py MODEL_DIR QUANT THREADS      (then JSON commands on stdin, one per line)

Same structure and feeds as tools/fixtures/ort_loop.py (which the goldens use): each step runs embed_tokens on
the ids, then decoder_model_merged with every past_key_values.* fed from the previous step's present.* numpy
arrays; image features are scattered into inputs_embeds at the image soft tokens; greedy argmax over the last
position; stops at an eos id or after max_new tokens. Sessions: intra_op_num_threads=THREADS,
inter_op_num_threads=1, default graph optimization (ORT_ENABLE_ALL), like the server.

Commands (stdin) and answers (stdout), one JSON object per line:
  {"npz": PATH, "max_new": 128}  -> {"ids": [...], "ttft_ms", "prefill_ms", "decode_ms", "decode_steps",
                                     "decode_run_ms", "prefill_run_ms"}
  {"stats": true}                -> {"peak_rss_mb"}
Timing: ttft_ms = first embed run start -> first token chosen (tokenization and image preprocessing are done
beforehand by prepare.py and not counted); decode_ms = first token -> last token; decode_run_ms = time inside
InferenceSession.run during the decode steps (which includes pybind's numpy <-> OrtValue copies).
"""
import json
import os
import resource
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import ort_loop  # noqa: E402  (Sessions, feed, QUANTS: the goldens' loop)


def main():
    model_dir, quant, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    gen_cfg = json.load(open(os.path.join(model_dir, "generation_config.json")))
    eos = set(gen_cfg.get("eos_token_id") or cfg.get("eos_token_id") or [])
    image_id = cfg["image_token_id"]
    sess = ort_loop.Sessions(os.path.join(model_dir, "onnx"), ort_loop.QUANTS[quant], threads=threads)
    for c in ("embed_tokens", "decoder_model_merged", "vision_encoder"):
        sess[c]  # load now, not inside a timed request
    dec = sess["decoder_model_merged"]
    emb = sess["embed_tokens"]
    out_names = [o.name for o in dec.get_outputs()]
    print(json.dumps({"ready": True, "ort": ort.__version__, "files": sess.files}), flush=True)

    def timed_run(s, names, feeds, acc):
        t = time.perf_counter()
        r = s.run(names, feeds)
        acc[0] += time.perf_counter() - t
        return r

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("stats"):
            print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
                  flush=True)
            continue
        data = np.load(cmd["npz"])
        ids = data["input_ids"]
        pixel_values = data["pixel_values"] if "pixel_values" in data else None
        max_new = cmd["max_new"]
        past = ort_loop.empty_past(dec)
        position_ids = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        toks = []
        run_acc = [0.0]
        prefill_run = 0.0
        t_start = time.perf_counter()
        t_first = None
        for step in range(max_new):
            inputs_embeds, per_layer_inputs = timed_run(emb, ["inputs_embeds", "per_layer_inputs"],
                                                        ort_loop.feed(emb, {"input_ids": ids}), run_acc)
            if step == 0 and pixel_values is not None:
                vs = sess["vision_encoder"]
                f = timed_run(vs, ["image_features"], ort_loop.feed(vs, {"pixel_values": pixel_values}), run_acc)[0]
                f = f.reshape(-1, f.shape[-1])
                flat = inputs_embeds.reshape(-1, inputs_embeds.shape[-1]).copy()
                flat[ids.reshape(-1) == image_id] = f.astype(flat.dtype)
                inputs_embeds = flat.reshape(inputs_embeds.shape)
            outs = timed_run(dec, out_names, ort_loop.feed(dec, dict(
                inputs_embeds=inputs_embeds, per_layer_inputs=per_layer_inputs, position_ids=position_ids,
                **past)), run_acc)
            res = dict(zip(out_names, outs))
            logits = res["logits"][0, -1]
            for name, val in res.items():
                if name.startswith("present."):
                    past["past_key_values." + name[len("present."):]] = val
            nxt = int(np.argmax(logits))
            toks.append(nxt)
            if step == 0:
                t_first = time.perf_counter()
                prefill_run = run_acc[0]
                run_acc[0] = 0.0
            if nxt in eos:
                break
            ids = np.array([[nxt]], dtype=np.int64)
            position_ids = position_ids[:, -1:] + 1
        t_end = time.perf_counter()
        print(json.dumps({"ids": toks, "ttft_ms": (t_first - t_start) * 1e3, "prefill_ms": (t_first - t_start) * 1e3,
                          "prefill_run_ms": prefill_run * 1e3, "decode_ms": (t_end - t_first) * 1e3,
                          "decode_steps": len(toks) - 1, "decode_run_ms": run_acc[0] * 1e3}), flush=True)


if __name__ == "__main__":
    main()
