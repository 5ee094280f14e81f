"""Helpers for the llama.cpp side of `make bench-peer` (run with target/peer/venv/bin/python; see peer_setup.sh).

usage: peer_gguf.py spm HF_DIR
           writes HF_DIR/tokenizer.model: the bench tokenizer (tokenizer.json, a byte-fallback BPE over "▁" pieces,
           like Gemma's) as a SentencePiece BPE model, so that convert_hf_to_gguf.py takes the SentencePiece path
           real Gemma checkpoints take (llama.cpp's SPM tokenizer); its BPE pre-tokenizer hash check knows no
           random tokenizer. Piece scores are -id: merges were added in rank order, so a higher id is a later merge.
       peer_gguf.py verify-onnx HF_DIR MODEL_DIR
           every text-decoder matrix (>= 64k elements) of the checkpoint must be found bit-exact (as is or
           transposed) among the initializers of MODEL_DIR/onnx/{embed_tokens,decoder_model_merged}.onnx (fp32).
       peer_gguf.py verify-gguf HF_DIR GGUF
           every f16/bf16/f32 tensor of the GGUF that maps back to a checkpoint tensor (token_embd, per-layer
           attention / FFN / per-layer-input projections) must equal it up to the output type's rounding.
"""
import json
import os
import sys

import numpy as np


def spm(hf):
    from sentencepiece import sentencepiece_model_pb2 as pb

    tj = json.load(open(os.path.join(hf, "tokenizer.json"), encoding="utf-8"))
    pieces = {i: p for p, i in tj["model"]["vocab"].items()}
    special = {}
    for t in tj["added_tokens"]:
        pieces[t["id"]] = t["content"]
        if t.get("special"):
            special[t["id"]] = t["content"]
    n = max(pieces) + 1
    assert sorted(pieces) == list(range(n)), "dense ids"
    m = pb.ModelProto()
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 3, 2, 1, 0
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = pieces[3], pieces[2], pieces[1], pieces[0]
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    for i in range(n):
        p = m.pieces.add()
        p.piece = pieces[i]
        p.score = float(-i)
        if i == 3:
            p.type = pb.ModelProto.SentencePiece.UNKNOWN
        elif i in special:
            p.type = pb.ModelProto.SentencePiece.CONTROL
        elif len(pieces[i]) == 6 and pieces[i].startswith("<0x") and pieces[i].endswith(">"):
            p.type = pb.ModelProto.SentencePiece.BYTE
            p.score = 0.0
        else:
            p.type = pb.ModelProto.SentencePiece.NORMAL
    out = os.path.join(hf, "tokenizer.model")
    with open(out, "wb") as f:
        f.write(m.SerializeToString())
    import sentencepiece as sp
    proc = sp.SentencePieceProcessor(model_file=out)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(hf, "tokenizer.json"))
    text = "Read this and answer briefly: the quick brown fox jumps over the lazy dog, 12 times; ok?"
    a = tok.encode(text, add_special_tokens=False).ids
    b = proc.encode(text)
    print(f"wrote {out}: {n} pieces, {len(special)} control; sample text: tokenizer.json {len(a)} tokens, "
          f"SentencePiece {len(b)} tokens, {'same ids' if a == b else 'different ids'}")


def checkpoint(hf):
    from safetensors import safe_open
    idx = os.path.join(hf, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    for fn in files:
        with safe_open(os.path.join(hf, fn), "np") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)


def onnx_inits(path):
    import onnx
    m = onnx.load(path, load_external_data=False)
    base = os.path.dirname(path)
    for t in m.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or not t.external_data:
            continue
        e = {x.key: x.value for x in t.external_data}
        count = int(np.prod(t.dims))
        if count < 65536:
            continue
        arr = np.memmap(os.path.join(base, e["location"]), dtype=np.float32, mode="r",
                        offset=int(e.get("offset", 0)), shape=(count,)).reshape(tuple(t.dims))
        yield f"{os.path.basename(path)}:{t.name}", arr


def verify_onnx(hf, model_dir):
    index = {}
    for comp in ("embed_tokens", "decoder_model_merged"):
        for name, arr in onnx_inits(os.path.join(model_dir, "onnx", f"{comp}.onnx")):
            key = (arr.shape, arr.reshape(-1)[:64].tobytes(), arr.reshape(-1)[-64:].tobytes())
            index.setdefault(key, []).append((name, arr))
    found, missing = [], []
    for k, w in checkpoint(hf):
        if "language_model" not in k or w.ndim != 2 or w.size < 65536:
            continue
        hit = None
        for cand, how in ((w, "as is"), (np.ascontiguousarray(w.T), "transposed")):
            key = (cand.shape, cand.reshape(-1)[:64].tobytes(), cand.reshape(-1)[-64:].tobytes())
            for name, arr in index.get(key, []):
                if np.array_equal(arr, cand):
                    hit = (name, how)
                    break
            if hit:
                break
        (found if hit else missing).append((k, hit))
    for k, hit in found[:4] + found[-2:]:
        print(f"  {k} == {hit[0]} ({hit[1]})")
    print(f"checkpoint vs ONNX: {len(found)} of {len(found) + len(missing)} text-decoder matrices bit-exact in the "
          f"fp32 graphs" + (f"; missing: {[k for k, _ in missing][:8]}" if missing else ""))
    if missing or not found:
        sys.exit(1)


GGUF_MAP = {  # gguf name pattern -> checkpoint name pattern ({b}: block)
    "token_embd.weight": "model.language_model.embed_tokens.weight",
    "per_layer_token_embd.weight": "model.language_model.embed_tokens_per_layer.weight",
    "blk.{b}.attn_q.weight": "model.language_model.layers.{b}.self_attn.q_proj.weight",
    "blk.{b}.attn_k.weight": "model.language_model.layers.{b}.self_attn.k_proj.weight",
    "blk.{b}.attn_v.weight": "model.language_model.layers.{b}.self_attn.v_proj.weight",
    "blk.{b}.attn_output.weight": "model.language_model.layers.{b}.self_attn.o_proj.weight",
    "blk.{b}.ffn_gate.weight": "model.language_model.layers.{b}.mlp.gate_proj.weight",
    "blk.{b}.ffn_up.weight": "model.language_model.layers.{b}.mlp.up_proj.weight",
    "blk.{b}.ffn_down.weight": "model.language_model.layers.{b}.mlp.down_proj.weight",
}


def verify_gguf(hf, path):
    sys.path.insert(0, os.environ.get("GGUF_PY", ""))
    import gguf
    r = gguf.GGUFReader(path)
    ck = dict(checkpoint(hf))
    checked, worst = 0, 0.0
    for t in r.tensors:
        src = None
        for g, c in GGUF_MAP.items():
            if "{b}" in g:
                pre, post = g.split("{b}")
                if t.name.startswith(pre) and t.name.endswith(post):
                    b = t.name[len(pre):-len(post)]
                    if b.isdigit():
                        src = c.format(b=b)
            elif t.name == g:
                src = c
        if src is None or src not in ck:
            continue
        kind = t.tensor_type.name
        if kind not in ("F16", "BF16", "F32"):
            continue
        w = ck[src]
        if kind == "BF16":
            a = (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.asarray(t.data).astype(np.float32)
        a = a.reshape(-1, w.shape[1])
        if a.shape[0] > w.shape[0]:  # embeddings padded with zero rows up to the full vocabulary (media ids)
            assert not a[w.shape[0]:].any(), f"{t.name}: padding rows are not zero"
            a = a[: w.shape[0]]
        ref = w.astype(np.float16).astype(np.float32) if kind == "F16" else \
            ((w.view(np.uint32) + 0x7FFF + ((w.view(np.uint32) >> 16) & 1)) >> 16 << 16).view(np.float32) \
            if kind == "BF16" else w
        diff = float(np.max(np.abs(a - ref)))
        worst = max(worst, diff)
        if diff != 0.0:
            sys.exit(f"{t.name} ({kind}) differs from {src}: max |diff| {diff}")
        checked += 1
    print(f"GGUF vs checkpoint: {checked} tensors equal to the checkpoint rounded to the GGUF's type "
          f"({os.path.basename(path)})")
    if checked == 0:
        sys.exit(1)


def main():
    cmd = sys.argv[1]
    if cmd == "spm":
        spm(sys.argv[2])
    elif cmd == "verify-onnx":
        verify_onnx(sys.argv[2], sys.argv[3])
    elif cmd == "verify-gguf":
        verify_gguf(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
