#!/usr/bin/env bash
# Builds the bench model (tools/bench/make_bench_model.py) into OUT_DIR, default target/bench-model/bench-gemma3n.
# Uses the fixture generator's venv (tools/fixtures/.venv, ~3 GB of torch wheels; created when missing).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:-$ROOT/target/bench-model/bench-gemma3n}"
shift || true
VENV="$ROOT/tools/fixtures/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$ROOT/tools/fixtures/requirements.txt"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONHASHSEED=0 \
       OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
mkdir -p "$(dirname "$OUT")"
LOG="$OUT.log"
echo "== bench model -> $OUT (log: $LOG)"
"$VENV/bin/python" "$HERE/make_bench_model.py" "$OUT" "$@" 2>&1 | tee "$LOG" \
    | grep -vE "[Ww]arn|W:onnxruntime|^\s*$|\[torch.onnx\]|^\s+(warnings\.warn|return|self\.)" || true
test -f "$OUT/bench_model.json" || { echo "!! bench model generation failed (see $LOG)"; exit 1; }
touch "$OUT/.complete"
