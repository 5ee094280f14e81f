"""The "bench" size of the fixture model: a random Gemma-3n with E2B's per-token cost per layer.

usage: python make_bench_model.py OUT_DIR [--layers 15] [--keep-scratch]
       python make_bench_model.py --hf-only OUT_DIR [--layers 15]

--hf-only saves the same seeded weights as a transformers checkpoint (save_pretrained, fp32 safetensors, with
the bench tokenizer and config files) and exports nothing: the source for llama.cpp's GGUF conversion
(tools/bench/peer_setup.sh).

OUT_DIR becomes a hub-layout snapshot (like tests/fixtures/tiny-gemma3n) with 12 graphs:
{embed_tokens, decoder_model_merged, vision_encoder, audio_encoder} x {"" (fp32), _quantized, _q4}, which
covers the quantization sets FP32, QUANTIZED, Q4_MIXED and Q4 (no _fp16: fp16 is a GPU format).

Text decoder: the real E2B geometry (hidden 2048, intermediate 8192, 8 heads / 2 KV heads / head_dim 256,
PLE 256 per layer, AltUp 4, Laurel 64, sliding window 512, a full-attention layer every 5th, the last third
of the layers sharing KV, 0.95 activation sparsity in the first third) with 15 layers instead of 30 and a
32 768-entry vocabulary instead of 262 400. The vision and audio towers are the tiny fixture ones
(MobileNetV5 at 1/32 width, 2-layer Conformer of width 32): the image path works end to end
(768x768 -> 256 soft tokens), but their cost is not the real towers'.

Reuses tools/fixtures: the seeded model recipe (tiny_gemma3n), the export wrappers and patches (export_onnx),
the quantization recipes (make_variants: quantize_dynamic and MatMulNBits, accuracy_level unset like the
onnx-community files), and the model-file constants (make_model_files). Everything is seeded; the run takes
~15-25 minutes and ~12 GB of RAM on 2 cores (see BENCHMARKS.md for a measured run).
"""
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))

import torch  # noqa: E402
from transformers import (Gemma3nAudioConfig, Gemma3nConfig, Gemma3nForConditionalGeneration,  # noqa: E402
                          Gemma3nTextConfig, Gemma3nVisionConfig)

import tiny_gemma3n as tg  # noqa: E402

TEXT_VOCAB = 32512
MM_VOCAB = 128                      # real: 128 vision + 128 audio embedder ids above the text vocabulary
VOCAB = TEXT_VOCAB + 2 * MM_VOCAB   # 32768
IDS = dict(pad=0, eos=1, bos=2, unk=3, sot=105, eot=106, boi=TEXT_VOCAB - 2, boa=TEXT_VOCAB - 1,
           eoi=TEXT_VOCAB, image=TEXT_VOCAB + 1, eoa=TEXT_VOCAB + MM_VOCAB, audio=TEXT_VOCAB + MM_VOCAB + 1)
SEED = 4321


def arg(flag, default=None):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def bench_config(layers=15):
    shared = layers // 3                  # E2B: 10 of 30 layers reuse KV
    sparse = layers // 3                  # E2B: 0.95 sparsity in layers 0-9 of 30
    text = Gemma3nTextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=TEXT_VOCAB,
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        hidden_size_per_layer_input=256, laurel_rank=64, altup_num_inputs=4,
        num_kv_shared_layers=shared,
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)],
        activation_sparsity_pattern=[0.95] * sparse + [0.0] * (layers - sparse),
        sliding_window=512, max_position_embeddings=32768,
        pad_token_id=IDS["pad"], bos_token_id=IDS["bos"], eos_token_id=[IDS["eos"], IDS["eot"]],
    )
    vision = Gemma3nVisionConfig(
        architecture="mobilenetv5_300m_enc",
        model_args={"channel_multiplier": tg.VISION_CHANNEL_MULTIPLIER},
        hidden_size=2048, vocab_size=MM_VOCAB, vocab_offset=TEXT_VOCAB,
    )
    audio = Gemma3nAudioConfig(
        vocab_size=MM_VOCAB, vocab_offset=TEXT_VOCAB + MM_VOCAB,
        hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=2, sscp_conv_channel_size=[8, 8],
    )
    cfg = Gemma3nConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=audio.to_dict(),
        audio_soft_tokens_per_image=tg.AUDIO_TOKENS, vision_soft_tokens_per_image=tg.IMAGE_TOKENS,
        boi_token_id=IDS["boi"], eoi_token_id=IDS["eoi"], image_token_id=IDS["image"],
        boa_token_id=IDS["boa"], eoa_token_id=IDS["eoa"], audio_token_id=IDS["audio"],
    )
    cfg._attn_implementation = "eager"
    return cfg


def build_model(cfg, seed=SEED):
    """tiny_gemma3n.build_model with another config: same seeded fan-in-scaled redraw of every weight."""
    tg._shrink_mobilenetv5_attention()
    torch.manual_seed(seed)
    model = Gemma3nForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dtype.is_floating_point:
                if p.ndim >= 2:
                    fan_in = int(torch.tensor(p.shape[1:]).prod())
                    p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in ** 0.5))
                else:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------- model files
def bench_tokenizer():
    """make_model_files.build_tokenizer's layout (ids 0-497 identical), stretched to TEXT_VOCAB text ids:
    the rest of the text range is normal `<unused_textN>` pieces, then boi/boa and the media vocabularies."""
    import make_model_files as mmf
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    special = {i: s for i, s in mmf.SPECIAL.items() if i < 105 + 2}
    special.update({IDS["boi"]: "<start_of_image>", IDS["boa"]: "<start_of_audio>",
                    IDS["eoi"]: "<end_of_image>", IDS["image"]: "<image_soft_token>",
                    IDS["eoa"]: "<end_of_audio>", IDS["audio"]: "<audio_soft_token>"})
    for i in range(IDS["image"] + 1, IDS["eoa"]):
        special[i] = f"<unused_vision{i - IDS['image'] - 1}>"
    for i in range(IDS["audio"] + 1, VOCAB):
        special[i] = f"<unused_audio{i - IDS['audio'] - 1}>"
    vocab = {t: i for i, t in special.items()}
    vocab["\n"], vocab["\n\n"] = 107, 108
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 109 + b
    nxt = 365
    for ch in ["▁"] + [chr(c) for c in range(33, 127)]:
        vocab[ch] = nxt
        nxt += 1
    merges = [("\n", "\n")]
    for word in mmf.MERGE_WORDS:
        cur = word[0]
        for ch in word[1:]:
            if cur + ch not in vocab:
                merges.append((cur, ch))
                vocab[cur + ch] = nxt
                nxt += 1
            cur = cur + ch
    for i in range(nxt, IDS["boi"]):
        vocab[f"<unused_text{i - nxt}>"] = i
    assert sorted(vocab.values()) == list(range(VOCAB)), "dense ids"
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(special[i], special=True, normalized=False) for i in sorted(special)])
    return tok


def write_model_files(out, cfg, external):
    import make_model_files as mmf

    os.makedirs(out, exist_ok=True)
    tok = bench_tokenizer()
    tok.save(f"{out}/tokenizer.json")
    specials = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}
    mmf.dump({"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "padding_side": "left", "model_max_length": 32768, "spaces_between_special_tokens": False,
              "clean_up_tokenization_spaces": False, "processor_class": "Gemma3nProcessor",
              "extra_special_tokens": specials}, f"{out}/tokenizer_config.json")
    mmf.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", **specials},
             f"{out}/special_tokens_map.json")
    with open(f"{out}/chat_template.jinja", "w", encoding="utf-8") as f:
        f.write(mmf.CHAT_TEMPLATE)
    mmf.dump({**mmf.IMAGE_PROCESSOR, **mmf.FEATURE_EXTRACTOR, "image_seq_length": 256,
              "processor_class": "Gemma3nProcessor"}, f"{out}/preprocessor_config.json")
    mmf.dump({"audio_seq_length": 188, "image_seq_length": 256, "processor_class": "Gemma3nProcessor"},
             f"{out}/processor_config.json")
    cfg.architectures = ["Gemma3nForConditionalGeneration"]
    d = cfg.to_dict()
    d.pop("transformers_version", None)
    d["torch_dtype"] = "float32"
    d["eos_token_id"] = [IDS["eos"], IDS["eot"]]
    rp = d["text_config"]["rope_parameters"]
    d["text_config"]["rope_theta"] = rp["full_attention"]["rope_theta"]
    d["text_config"]["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    d["transformers.js_config"] = {"use_external_data_format": external}
    mmf.dump(d, f"{out}/config.json")
    mmf.dump(mmf.GENERATION_CONFIG, f"{out}/generation_config.json")


# ------------------------------------------------------------------------------------------------- export
def export(module, args, path, input_names, output_names, dynamic_shapes, external):
    """torch.onnx.export(dynamo=True) like tools/fixtures/export_onnx.py, but graphs over 2 GB keep their
    weights in `<name>.onnx_data`; the per-node source metadata is stripped without loading the weights."""
    import onnx

    t = time.time()
    prog = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                             output_names=output_names, opset_version=18)
    for stale in (path + "_data", path + ".data"):
        if os.path.exists(stale):
            os.remove(stale)
    prog.save(path, external_data=external)
    del prog
    m = onnx.load(path, load_external_data=False)
    for node in m.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del m.graph.value_info[:]
    if os.path.exists(path + ".data"):  # torch names it <name>.onnx.data; the hub layout says <name>.onnx_data
        os.rename(path + ".data", path + "_data")
        for init in m.graph.initializer:
            for e in init.external_data:
                if e.key == "location":
                    e.value = os.path.basename(path) + "_data"
    onnx.save(m, path)
    size = os.path.getsize(path) + (os.path.getsize(path + "_data") if os.path.exists(path + "_data") else 0)
    print(f"exported {os.path.basename(path)} in {time.time() - t:.0f}s, {size / 1e6:.0f} MB", flush=True)


def export_all(model, out):
    from torch.export import Dim
    import export_onnx as ex

    ex._patch_gaussian_topk(model)
    tc = model.config.text_config
    B, S, P, T = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length"), Dim("num_frames")
    inp = tg.example_inputs()
    with torch.no_grad():
        ids = torch.randint(107, 400, (1, 20))
        export(ex.EmbedTokens(model), (ids,), f"{out}/embed_tokens.onnx", ["input_ids"],
               ["inputs_embeds", "per_layer_inputs"], {"input_ids": {0: B, 1: S}}, True)
        export(ex.VisionEncoder(model), (inp["pixel_values"],), f"{out}/vision_encoder.onnx", ["pixel_values"],
               ["image_features"], {"pixel_values": {0: B}}, True)
        ainp = tg.example_inputs(audio_frames=487)
        export(ex.AudioEncoder(model), (ainp["input_features"], ainp["input_features_mask"]),
               f"{out}/audio_encoder.onnx", ["input_features", "input_features_mask"], ["audio_features"],
               {"input_features": {0: B, 1: T}, "input_features_mask": {0: B, 1: T}}, False)
        dec = ex.Decoder(model)
        s, p = 5, 3
        args = [torch.randn(1, s, tc.hidden_size),
                torch.randn(1, s, tc.num_hidden_layers, tc.hidden_size_per_layer_input),
                torch.arange(p, p + s).unsqueeze(0)]
        names, onames, dyn = ["inputs_embeds", "per_layer_inputs", "position_ids"], ["logits"], []
        for i in range(dec.n_kv):
            for kv in ("key", "value"):
                args.append(torch.randn(1, tc.num_key_value_heads, p, tc.head_dim))
                names.append(f"past_key_values.{i}.{kv}")
                onames.append(f"present.{i}.{kv}")
                dyn.append({0: B, 2: P})
        dyn_shapes = ({0: B, 1: S}, {0: B, 1: S}, {0: B, 1: S}, tuple(dyn))
        export(dec, tuple(args), f"{out}/decoder_model_merged.onnx", names, onames, dyn_shapes, True)


# ----------------------------------------------------------------------------------------------- variants
COMPS = ["embed_tokens", "vision_encoder", "audio_encoder", "decoder_model_merged"]


def make_variants(src, dst, comp):
    """_quantized and _q4 of one graph with make_variants.py's recipes; fp32 moved over with its external data."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    import make_variants as mv

    sp = f"{src}/{comp}.onnx"
    t = time.time()
    m = onnx.load(sp, load_external_data=False)
    has_conv = any(n.op_type == "Conv" for n in m.graph.node)
    del m
    quantize_dynamic(sp, f"{dst}/{comp}_quantized.onnx",
                     weight_type=QuantType.QUInt8 if has_conv else QuantType.QInt8,
                     per_channel=False, reduce_range=False, extra_options={"MatMulConstBOnly": True})
    print(f"{comp}_quantized in {time.time() - t:.0f}s", flush=True)
    t = time.time()
    q4 = mv.to_q4(onnx.load(sp))
    onnx.save(q4, f"{dst}/{comp}_q4.onnx")
    del q4
    print(f"{comp}_q4 in {time.time() - t:.0f}s", flush=True)
    for f in (f"{comp}.onnx", f"{comp}.onnx_data"):
        if os.path.exists(f"{src}/{f}"):
            shutil.move(f"{src}/{f}", f"{dst}/{f}")


def check(dst):
    """Every graph loads in onnxruntime; sizes, op counts and I/O go to bench_model.json."""
    import collections
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    graphs = {}
    for comp in COMPS:
        for suf in ("", "_quantized", "_q4"):
            fn = f"{comp}{suf}.onnx"
            path = f"{dst}/{fn}"
            files = [fn] + sorted(x for x in os.listdir(dst) if x.startswith(fn + "_data"))
            size = sum(os.path.getsize(f"{dst}/{x}") for x in files)
            m = onnx.load(path, load_external_data=False)
            ops = collections.Counter(n.op_type for n in m.graph.node)
            del m
            s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            graphs[fn] = {"files": files, "bytes": size,
                          "ops": {k: ops[k] for k in ("MatMul", "MatMulNBits", "MatMulInteger", "Gather",
                                                      "ConvInteger", "Conv") if ops.get(k)},
                          "inputs": len(s.get_inputs()), "outputs": len(s.get_outputs())}
            del s
            print(f"{fn}: {size / 1e6:.0f} MB, loads; ops {graphs[fn]['ops']}", flush=True)
    return graphs


def stage(name, *args):
    """Each step in its own process, so that peak memory is one step's, not the sum of what Python keeps."""
    import subprocess
    t = time.time()
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--stage", name, *args])
    if r.returncode:
        sys.exit(f"stage {name} {args} failed ({r.returncode})")
    return time.time() - t


def stage_main(name, args):
    if name == "export":
        out, scratch, layers = args[0], args[1], int(args[2])
        t = time.time()
        cfg = bench_config(layers)
        model = build_model(cfg)
        n = {k: sum(p.numel() for p in mod.parameters()) for k, mod in
             [("total", model), ("text", model.model.language_model), ("vision", model.model.vision_tower),
              ("audio", model.model.audio_tower)]}
        print(f"params (M): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in n.items()) +
              f"; built in {time.time() - t:.0f}s", flush=True)
        write_model_files(out, cfg, {"embed_tokens.onnx": 1, "decoder_model_merged.onnx": 1,
                                     "vision_encoder.onnx": 1})
        with open(f"{scratch}/params.json", "w") as f:
            json.dump(n, f)
        export_all(model, scratch)
    elif name == "variants":
        make_variants(args[0], args[1], args[2])
    elif name == "check":
        with open(f"{args[1]}/graphs.json", "w") as f:
            json.dump(check(args[0]), f)


def save_hf(out, layers):
    """The bench model's weights as a transformers checkpoint: the same recipe and seed as the ONNX export."""
    t = time.time()
    cfg = bench_config(layers)
    model = build_model(cfg)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    write_model_files(out, cfg, {})  # the bench snapshot's config.json and tokenizer files (after save_pretrained)
    print(f"saved {out} in {time.time() - t:.0f}s", flush=True)


def main():
    if "--hf-only" in sys.argv:
        return save_hf(os.path.abspath(arg("--hf-only")), int(arg("--layers", "15")))
    if "--stage" in sys.argv:
        i = sys.argv.index("--stage")
        return stage_main(sys.argv[i + 1], sys.argv[i + 2:])
    import resource
    out = os.path.abspath(sys.argv[1])
    layers = int(arg("--layers", "15"))
    t0 = time.time()
    scratch = out + ".scratch"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    os.makedirs(f"{out}/onnx")
    times = {"export": stage("export", out, scratch, str(layers))}
    times["variants"] = sum(stage("variants", scratch, f"{out}/onnx", c) for c in COMPS)
    times["check"] = stage("check", f"{out}/onnx", scratch)
    with open(f"{scratch}/params.json") as f:
        params = json.load(f)
    with open(f"{scratch}/graphs.json") as f:
        graphs = json.load(f)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    if "--keep-scratch" not in sys.argv:
        shutil.rmtree(scratch, ignore_errors=True)
    times["total"] = time.time() - t0
    tc = bench_config(layers).text_config
    summary = {
        "config": {"layers": tc.num_hidden_layers, "hidden": tc.hidden_size, "intermediate": tc.intermediate_size,
                   "heads": tc.num_attention_heads, "kv_heads": tc.num_key_value_heads, "head_dim": tc.head_dim,
                   "kv_shared_layers": tc.num_kv_shared_layers, "vocab": tc.vocab_size,
                   "vocab_per_layer_input": tc.vocab_size_per_layer_input,
                   "ple": tc.hidden_size_per_layer_input, "sliding_window": tc.sliding_window,
                   "layer_types": tc.layer_types, "activation_sparsity": tc.activation_sparsity_pattern},
        "params": params, "graphs": graphs, "seconds": {k: round(v) for k, v in times.items()},
        "peak_rss_gb": round(peak, 1),
    }
    with open(f"{out}/bench_model.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary["seconds"]), f"peak RSS of a step {peak:.1f} GB")
    print(f"done: {out} in {times['total']:.0f}s")


if __name__ == "__main__":
    main()
