"""Bench inputs, made once per model with the transformers processor (tools/fixtures/.venv).

usage: python prepare.py MODEL_DIR OUT_DIR MEDIA_DIR [--lengths 32,512]

MEDIA_DIR gets deterministic media (made only when missing): photo_1280x960.jpg (smooth gradients, shapes and
noise, JPEG q90, 4:2:0 like a camera picture), speech_like_10s.wav and speech_like_30s.wav (16 kHz mono PCM16).

OUT_DIR gets cases.json and one <case>.npz per case. A case is a user message of plain text whose rendered and
tokenized prompt is exactly N tokens (N in --lengths), alone or after one image (the image adds its 256 soft
tokens and the 4 tokens around them). Each .npz holds what the model card's loop feeds: `input_ids` and, for
image cases, `pixel_values`, both from the processor (PIL backend: the one onnx-chat matches bit for bit).
"""
import base64
import io
import json
import os
import sys
import wave

import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def arg(flag, default=None):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def make_media(media_dir):
    from PIL import Image, ImageDraw

    os.makedirs(media_dir, exist_ok=True)
    photo = os.path.join(media_dir, "photo_1280x960.jpg")
    if not os.path.exists(photo):
        rng = np.random.default_rng(11)
        h, w = 960, 1280
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = 128 + 100 * np.sin(x / 97.0) * np.cos(y / 131.0)
        g = 128 + 90 * np.sin((x + y) / 173.0)
        b = 128 + 80 * np.cos(np.hypot(x - 640, y - 480) / 61.0)
        img = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        d = ImageDraw.Draw(im)
        for i in range(40):
            x0, y0 = int(rng.integers(0, w - 200)), int(rng.integers(0, h - 200))
            box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (d.ellipse if i % 2 else d.rectangle)(box, fill=color)
        im.save(photo, quality=90, subsampling=2)
    for secs in (10, 30):
        path = os.path.join(media_dir, f"speech_like_{secs}s.wav")
        if os.path.exists(path):
            continue
        sr = 16000
        t = np.arange(secs * sr) / sr
        rng = np.random.default_rng(secs)
        f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
        voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sr) / k for k in range(1, 12))
        env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
        sig = 0.25 * env * voiced / 3 + 0.02 * rng.normal(size=t.shape)
        pcm = np.clip(sig * 32767, -32768, 32767).astype("<i2")
        with wave.open(path, "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(sr)
            f.writeframes(pcm.tobytes())


def main():
    model_dir, out, media_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    lengths = [int(x) for x in arg("--lengths", "32,512").split(",")]
    make_media(media_dir)
    os.makedirs(out, exist_ok=True)
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir, backend="pil")
    photo = os.path.join(media_dir, "photo_1280x960.jpg")
    with open(photo, "rb") as f:
        photo_bytes = f.read()
    pil = Image.open(io.BytesIO(photo_bytes)).convert("RGB")
    data_url = "data:image/jpeg;base64," + base64.b64encode(photo_bytes).decode()

    def encode(text, image):
        items = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        rendered = proc.apply_chat_template([{"role": "user", "content": items}], tokenize=False,
                                            add_generation_prompt=True)
        kw = {"images": [pil]} if image else {}
        return proc(text=rendered, return_tensors="np", add_special_tokens=False, **kw)

    rng = np.random.default_rng(5)
    words = " ".join("".join(rng.choice(list(LETTERS), int(rng.integers(2, 9)))) for _ in range(2000))
    cases = []
    for n in lengths:
        # the shortest prefix of the word stream whose prompt is exactly n tokens (no trailing space: | trim)
        lo = 1
        while len(encode(words[:lo].strip(), False)["input_ids"][0]) < n:
            lo += 1
        text = words[:lo].strip()
        if len(encode(text, False)["input_ids"][0]) != n:
            sys.exit(f"cannot hit {n} prompt tokens exactly")
        for image in (False, True):
            enc = encode(text, image)
            name = f"p{n}" + ("+image" if image else "")
            arrays = {"input_ids": enc["input_ids"].astype(np.int64)}
            if image:
                arrays["pixel_values"] = enc["pixel_values"].astype(np.float32)
            np.savez(os.path.join(out, f"{name}.npz"), **arrays)
            content = ([{"type": "image_url", "image_url": {"url": data_url}}] if image else []) + \
                [{"type": "text", "text": text}]
            cases.append({"name": name, "text_tokens": n, "image": image,
                          "prompt_tokens": int(enc["input_ids"].shape[1]),
                          "npz": f"{name}.npz", "messages": [{"role": "user", "content": content}]})
            print(f"{name}: {cases[-1]['prompt_tokens']} prompt tokens", flush=True)
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump({"model_dir": os.path.abspath(model_dir), "cases": cases}, f)


if __name__ == "__main__":
    main()
