"""Media preprocessing with the transformers processor, timed like benches/media.rs (tools/fixtures/.venv).

usage: python ref_media.py --model-dir DIR --image FILE... --audio FILE... [--repeats 20]

- image: PIL decode + convert("RGB") + the Gemma-3n image processor (SiglipImageProcessor: resize to 768x768
  bilinear, rescale, channel-first float32), for the PIL backend (the one onnx-chat matches bit for bit) and for
  AutoProcessor's default backend (torchvision when installed);
- audio: soundfile decode + Gemma3nAudioFeatureExtractor (16 kHz, log-mel 128 bins).
torch keeps its default thread count (all cores) unless --torch-threads N is given.
Prints one JSON object shaped like the Rust bench's output.
"""
import io
import json
import sys
import time

import numpy as np


def args(flag):
    return [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == flag]


def time_it(repeats, f):
    f()
    f()
    ms = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ms.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": float(np.median(ms)), "min_ms": float(min(ms)), "repeats": repeats}


def main():
    import soundfile as sf
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    model_dir = args("--model-dir")[0]
    repeats = int((args("--repeats") or ["20"])[0])
    torch.set_num_threads(int((args("--torch-threads") or ["0"])[0]) or torch.get_num_threads())
    backends = {"pil": AutoProcessor.from_pretrained(model_dir, backend="pil")}
    default = AutoProcessor.from_pretrained(model_dir)
    backends["default"] = default
    fe = backends["pil"].feature_extractor
    out = {"images": {}, "audio": {}, "classes": {k: type(p.image_processor).__name__ for k, p in backends.items()},
           "feature_extractor": type(fe).__name__, "torch_threads": torch.get_num_threads()}
    for path in args("--image"):
        data = open(path, "rb").read()
        entry = {}
        for name, proc in backends.items():
            ip = proc.image_processor

            def run():
                img = Image.open(io.BytesIO(data)).convert("RGB")
                return ip(images=[img], return_tensors="np")["pixel_values"]

            entry[name] = time_it(repeats, run)
            entry[name]["shape"] = list(run().shape)
        out["images"][path] = entry
    for path in args("--audio"):
        data = open(path, "rb").read()

        def run():
            wav, sr = sf.read(io.BytesIO(data), dtype="float32")
            return fe(wav, sampling_rate=sr, return_tensors="np")

        r = time_it(repeats, run)
        r["frames"] = int(run()["input_features"].shape[1])
        wav, sr = sf.read(io.BytesIO(data), dtype="float32")
        r["seconds"] = len(wav) / sr
        out["audio"][path] = r
    print(json.dumps(out))


if __name__ == "__main__":
    main()
