"""Exports a Granite Vision 3.x checkpoint (transformers' LlavaNextForConditionalGeneration with a Granite text
model, e.g. ibm-granite/granite-vision-3.2-2b) to ONNX in the transformers.js layout onnx-chat serves.

usage: python granite_vision.py SRC OUT_DIR [--quants fp32,quantized,q4] [--no-check] [--external-data]

SRC is a local checkpoint directory or a hub repo id (downloaded with huggingface_hub; needs network).
OUT_DIR gets the checkpoint's tokenizer / chat template / config / processor files, copied as they are (COPY), and
onnx/:

  vision_encoder{,_quantized,_q4}.onnx
      pixel_values f32 [num_tiles, 3, 384, 384]  (the base image first, then the anyres tiles, of any images)
      -> image_features f32 [num_tiles, 729, hidden]  (vision_feature_layer hidden states concatenated,
         vision_feature_select_strategy applied, multi_modal_projector)
      -> image_newline f32 [hidden]                    (LlavaNextModel.image_newline)
  embed_tokens{,_quantized}.onnx
      input_ids i64 [batch, seq] -> inputs_embeds f32 [batch, seq, hidden]   (the raw table: Granite's
      embedding_multiplier is applied by the language model to all inputs_embeds, image rows included, so it
      lives in the decoder graph)
  decoder_model_merged{,_quantized,_q4}.onnx
      inputs_embeds, attention_mask i64 [batch, past + seq], position_ids i64 [batch, seq],
      past_key_values.{i}.key/value f32 [batch, kv_heads, past, head_dim]
      -> logits f32 [batch, seq, vocab], present.{i}.key/value
      (embedding / attention / residual multipliers inside; no division by logits_scaling, because
      LlavaNextForConditionalGeneration's head does not apply it: the logits equal transformers')

The anyres packing (unpadding the tile grid to the image's aspect ratio, one image_newline after each feature
row, the base tile's features first) is left to the server, which knows each image's size.

Quantized sets: `quantized` = onnxruntime quantize_dynamic (int8 weights: QInt8, QUInt8 for graphs with a Conv,
per-tensor, MatMulConstBOnly), `q4` = MatMulNBits (4-bit, block 32, symmetric) for the vision encoder and the
decoder (the embedding table has no MatMul; its q4 set falls back to `_quantized`). Graphs over 2 GB are saved
with external data (`NAME.onnx_data`; --external-data forces it, to try that path on a small model). When SRC is a repo id, config.json gets `_name_or_path: SRC`, so the
server names the export like the catalog entry (`granite-vision-3.2-2b` and the repo id). Each exported fp32 graph is checked against torch unless --no-check.
"""
import json
import os
import shutil
import sys
import time

import torch
from torch import nn

# Copied byte for byte, as the checkpoint has them: the processor files in particular are not flattened or filled in
# (transformers 5 writes only processor_config.json, the image processor nested under "image_processor"; older
# snapshots have a flat preprocessor_config.json; the server reads both with transformers' precedence).
COPY = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
        "video_preprocessor_config.json", "added_tokens.json", "vocab.json", "merges.txt"]
LIMIT = 1_900_000_000  # bytes of one protobuf before external data is used


def external(model_proto):
    """Whether a graph is saved with external data: over LIMIT, or always with --external-data (to try the
    large-model path on a small checkpoint)."""
    return "--external-data" in sys.argv or sum(i.ByteSize() for i in model_proto.graph.initializer) > LIMIT


def arg(flag, default=None):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


class VisionEncoder(nn.Module):
    """LlavaNextModel.get_image_features up to (not including) the packing, for a flat batch of tiles."""

    def __init__(self, m):
        super().__init__()
        self.tower = m.model.vision_tower
        self.projector = m.model.multi_modal_projector
        self.newline = m.model.image_newline
        layer = m.config.vision_feature_layer
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_first = m.config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = torch.cat([out.hidden_states[i] for i in self.layers], dim=-1)
        if self.drop_first:
            feats = feats[:, 1:]
        return self.projector(feats), self.newline * 1.0


class EmbedTokens(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.embed = m.model.language_model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class Decoder(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.lm = m.model.language_model
        self.head = m.lm_head
        self.n = m.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n)])
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=True, return_dict=True)
        presents = []
        for i in range(self.n):
            presents += [cache.layers[i].keys, cache.layers[i].values]
        return (self.head(out.last_hidden_state), *presents)


def load_proto(path):
    import onnx

    return onnx.load(path, load_external_data=True)


def export(module, args, path, input_names, output_names, dynamic_shapes):
    import onnx

    t = time.time()
    prog = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                             output_names=output_names, opset_version=18)
    tmp = path + ".tmp"
    prog.save(tmp, external_data=True)
    m = onnx.load(tmp, load_external_data=True)
    for node in m.graph.node:  # the dynamo exporter stores a stack trace per node: drop it to keep files small
        del node.metadata_props[:]
        node.doc_string = ""
    del m.graph.value_info[:]
    big = external(m)
    if big:
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(path) + "_data", size_threshold=1024)
    else:
        onnx.save(m, path)
    for f in os.listdir(os.path.dirname(path)):
        if f.startswith(os.path.basename(tmp)):
            os.remove(os.path.join(os.path.dirname(path), f))
    print(f"exported {path} in {time.time() - t:.1f}s{' (external data)' if big else ''}", flush=True)


def quantize(onnx_dir, name, variant):
    import onnx

    src, dst = f"{onnx_dir}/{name}.onnx", f"{onnx_dir}/{name}_{variant}.onnx"
    m = load_proto(src)
    big = external(m)
    if variant == "quantized":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        has_conv = any(n.op_type == "Conv" for n in m.graph.node)
        quantize_dynamic(src, dst, weight_type=QuantType.QUInt8 if has_conv else QuantType.QInt8,
                         per_channel=False, reduce_range=False, use_external_data_format=big,
                         extra_options={"MatMulConstBOnly": True})
        if big:  # onnxruntime names the data `NAME.onnx.data`; the hub layout (and the server) use `NAME.onnx_data`
            out = onnx.load(dst, load_external_data=True)
            os.remove(dst + ".data")
            onnx.save(out, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=os.path.basename(dst) + "_data", size_threshold=1024)
    elif variant == "q4":
        if not any(n.op_type == "MatMul" for n in m.graph.node):
            return None
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(m, bits=4, block_size=32, is_symmetric=True, accuracy_level=None)
        q.process()
        out = q.model.model
        if big:
            onnx.save(out, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=os.path.basename(dst) + "_data", size_threshold=1024)
        else:
            onnx.save(out, dst)
    else:
        raise SystemExit(f"unknown quantization {variant!r} (fp32, quantized, q4)")
    print(f"{name}_{variant}.onnx", flush=True)
    return dst


def resolve_source(src):
    if os.path.isdir(src):
        return src
    from huggingface_hub import snapshot_download

    return snapshot_download(src, allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model"])


def check(onnx_dir, model, samples):
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for name, (module, args, names) in samples.items():
        s = ort.InferenceSession(f"{onnx_dir}/{name}.onnx", so, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = module(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = s.run(None, dict(zip(names, [a.numpy() for a in args])))
        d = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref))
        scale = max(float(np.abs(r.numpy()).max()) for r in ref)
        print(f"check {name}: max |onnx - torch| {d:.2e} (max |torch| {scale:.2e})", flush=True)
        assert d <= 1e-3 * max(1.0, scale), f"{name} differs from torch by {d}"


def main():
    if len(sys.argv) < 3 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    src, out = resolve_source(sys.argv[1]), sys.argv[2]
    quants = [q for q in arg("--quants", "fp32,quantized,q4").split(",") if q]
    onnx_dir = os.path.join(out, "onnx")
    os.makedirs(onnx_dir, exist_ok=True)
    for f in COPY:
        if os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(out, f))
    if not os.path.isdir(sys.argv[1]):
        # the repo id the export came from: onnx-chat serves it under that model's catalog names
        with open(os.path.join(out, "config.json")) as fh:
            c = json.load(fh)
        c["_name_or_path"] = sys.argv[1]
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump(c, fh, indent=2)
            fh.write("\n")

    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    cfg = AutoConfig.from_pretrained(src)
    if cfg.model_type != "llava_next":
        raise SystemExit(f"{src}: model_type {cfg.model_type!r}, expected 'llava_next'")
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    model = LlavaNextForConditionalGeneration.from_pretrained(src, config=cfg, dtype=torch.float32).eval()
    tc, vc = cfg.text_config, cfg.vision_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    from torch.export import Dim

    B, N, S, P = Dim("batch_size"), Dim("num_tiles"), Dim("sequence_length"), Dim("past_sequence_length")
    T = Dim("total_sequence_length")
    g = torch.Generator().manual_seed(7)
    samples = {}
    with torch.no_grad():
        pv = torch.rand((2, 3, vc.image_size, vc.image_size), generator=g) * 2 - 1
        export(VisionEncoder(model), (pv,), f"{onnx_dir}/vision_encoder.onnx", ["pixel_values"],
               ["image_features", "image_newline"], {"pixel_values": {0: N}})
        samples["vision_encoder"] = (VisionEncoder(model), (pv,), ["pixel_values"])
        ids = torch.randint(1, tc.vocab_size, (1, 9), generator=g)
        export(EmbedTokens(model), (ids,), f"{onnx_dir}/embed_tokens.onnx", ["input_ids"], ["inputs_embeds"],
               {"input_ids": {0: B, 1: S}})
        samples["embed_tokens"] = (EmbedTokens(model), (ids,), ["input_ids"])
        s, p = 5, 3
        args = [torch.randn(1, s, tc.hidden_size, generator=g), torch.ones(1, p + s, dtype=torch.long),
                torch.arange(p, p + s).unsqueeze(0)]
        names, onames = ["inputs_embeds", "attention_mask", "position_ids"], ["logits"]
        dyn = [{0: B, 1: S}, {0: B, 1: T}, {0: B, 1: S}]
        for i in range(tc.num_hidden_layers):
            for kv in ("key", "value"):
                args.append(torch.randn(1, tc.num_key_value_heads, p, head_dim, generator=g))
                names.append(f"past_key_values.{i}.{kv}")
                onames.append(f"present.{i}.{kv}")
                dyn.append({0: B, 2: P})
        export(Decoder(model), tuple(args), f"{onnx_dir}/decoder_model_merged.onnx", names, onames,
               (*dyn[:3], tuple(dyn[3:])))
        samples["decoder_model_merged"] = (Decoder(model), tuple(args), names)
    if "--no-check" not in sys.argv:
        check(onnx_dir, model, samples)
    del model
    import logging

    logging.getLogger("root").setLevel(logging.ERROR)
    for q in quants:
        if q == "fp32":
            continue
        for name in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
            quantize(onnx_dir, name, q)
    if "fp32" not in quants:
        for name in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
            for f in os.listdir(onnx_dir):
                if f == f"{name}.onnx" or f.startswith(f"{name}.onnx_data"):
                    os.remove(os.path.join(onnx_dir, f))
    print("wrote", sorted(os.listdir(onnx_dir)))


if __name__ == "__main__":
    main()
