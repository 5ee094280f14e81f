#!/usr/bin/env bash
# Exports a Granite Vision 3.x checkpoint to the ONNX layout onnx-chat serves (one command):
#
#   tools/export/export.sh ibm-granite/granite-vision-3.2-2b models/granite-vision-3.2-2b [--quants fp32,quantized,q4]
#   tools/export/export.sh path/to/checkpoint out/dir
#
# A repo id is downloaded with huggingface_hub (HF_TOKEN / HF_HOME as usual; needs network). Uses the pinned Python
# environment of the fixture generator, tools/fixtures/.venv (created from tools/fixtures/requirements.txt when
# missing, ~3 GB). The 2B model needs about 30 GB of memory and tens of minutes on CPU; see tools/export/README.md.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/../fixtures/.venv"
if [ $# -lt 2 ]; then
    sed -n '2,9p' "$0"
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$HERE/../fixtures/requirements.txt"
fi
export TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" "$HERE/granite_vision.py" "$@"
