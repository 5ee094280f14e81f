#!/usr/bin/env bash
# Exports a Granite Vision 3.x checkpoint to the ONNX layout onnx-chat serves (one command):
#
#   tools/export/export.sh ibm-granite/granite-vision-3.2-2b models/granite-vision-3.2-2b [--quants fp32,quantized,q4]
#   tools/export/export.sh path/to/checkpoint out/dir
#
# A repo id is downloaded with huggingface_hub (HF_TOKEN / HF_HOME as usual; needs network). Uses the pinned Python
# environment of the fixture generator, tools/fixtures/.venv (created from tools/fixtures/requirements.txt when
# missing, ~3 GB). The 2B model needs about 30 GB of memory and tens of minutes on CPU; see tools/export/README.md.
# Then checks the result with the server itself: `onnx-chat inspect OUT_DIR` loads it as `serve` does (configs,
# tokenizer, template, processor settings from processor_config.json / preprocessor_config.json, every graph) and
# the export fails if that does not load. The binary: $ONNX_CHAT if set, else `cargo run --release` in this
# repository, else `onnx-chat` on PATH.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/../fixtures/.venv"
if [ $# -lt 2 ]; then
    sed -n '2,12p' "$0"
    exit 2
fi
OUT="$2"
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$HERE/../fixtures/requirements.txt"
fi
export TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" "$HERE/granite_vision.py" "$@"

# The check: what the server reads of the export, read by the server.
if [ -n "${ONNX_CHAT:-}" ]; then
    INSPECT=("$ONNX_CHAT" inspect)
elif command -v cargo > /dev/null && [ -f "$ROOT/Cargo.toml" ]; then
    INSPECT=(cargo run --release --quiet --manifest-path "$ROOT/Cargo.toml" -- inspect)
elif command -v onnx-chat > /dev/null; then
    INSPECT=(onnx-chat inspect)
else
    echo "!! cannot check the export: no \$ONNX_CHAT, cargo or onnx-chat on PATH" >&2
    exit 1
fi
echo "== check: ${INSPECT[*]} $OUT"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
if ! "${INSPECT[@]}" "$OUT" --threads 1 > "$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "!! $OUT does not load in onnx-chat (above: the error, e.g. a processor setting not found in" \
         "processor_config.json or preprocessor_config.json); the export is not usable as written" >&2
    exit 1
fi
# What the server read, and from which file: the processor settings and the load verdict.
sed -n '/^processor settings:/,/^loads as served:/p' "$LOG"
echo "== $OUT loads in onnx-chat"
