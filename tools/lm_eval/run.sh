#!/usr/bin/env bash
# Smoke test: lm-evaluation-harness (lm-eval 0.4.13, `local-completions`) against onnx-chat's
# /v1/completions on the tiny committed test model, with a local generate_until task (no hub access).
#
#   tools/lm_eval/run.sh            # from anywhere; see README.md next to this file
#
# Environment (all optional):
#   ONNX_CHAT_BIN   server binary (default: target/release/onnx-chat, else target/debug/onnx-chat,
#                   else `cargo run --release --`)
#   MODEL_DIR       model snapshot (default: tests/fixtures/tiny-gemma3n), served as MODEL_NAME
#   MODEL_NAME      served model name (default: the directory name, tiny-gemma3n)
#   QUANT           --quant for the server (default: FP32)
#   PORT            server port (default: a free one)
#   LIMIT           documents to evaluate (default: 10, the whole task)
#   BATCH_SIZE      prompts per request (default: 1; >1 sends `prompt` as a list of strings)
#   NUM_CONCURRENT  concurrent requests (default: 1)
#   READY_TIMEOUT   seconds to wait for the server (default: 180)
#   PYTHON          interpreter for the venv (default: python3)
#
# Exit status: non-zero when the server does not come up, lm_eval fails, or the results JSON lacks
# tiny_echo's exact_match.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
PYTHON="${PYTHON:-python3}"
MODEL_DIR="${MODEL_DIR:-$ROOT/tests/fixtures/tiny-gemma3n}"
MODEL_NAME="${MODEL_NAME:-$(basename "$MODEL_DIR")}"
QUANT="${QUANT:-FP32}"
LIMIT="${LIMIT:-10}"
BATCH_SIZE="${BATCH_SIZE:-1}"
NUM_CONCURRENT="${NUM_CONCURRENT:-1}"
READY_TIMEOUT="${READY_TIMEOUT:-180}"
TASK=tiny_echo
METRIC="exact_match,none"

log() { printf '[lm_eval/run.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- 1. The harness venv, (re)installed when missing or when requirements.txt changed. -----------
req_sum="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/lm_eval" || "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$req_sum" ]]; then
    log "installing lm-eval into $VENV"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
    echo "$req_sum" >"$VENV/.requirements.sha256"
fi

# --- 2. The server. --------------------------------------------------------------------------------
if [[ -n "${ONNX_CHAT_BIN:-}" ]]; then
    server=("$ONNX_CHAT_BIN")
elif [[ -x "$ROOT/target/release/onnx-chat" ]]; then
    server=("$ROOT/target/release/onnx-chat")
elif [[ -x "$ROOT/target/debug/onnx-chat" ]]; then
    server=("$ROOT/target/debug/onnx-chat")
else
    server=(cargo run --release --quiet --)
fi
PORT="${PORT:-$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
BASE="http://127.0.0.1:$PORT"

RUN_DIR="$HERE/results/run-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RUN_DIR"
SERVER_LOG="$RUN_DIR/server.log"

server_pid=""
stop_server() {
    [[ -n "$server_pid" ]] || return 0
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# From the repository root, so the server finds ONNX Runtime in ./.venv (`make setup`).
[[ -n "${ORT_DYLIB_PATH:-}" || -d "$ROOT/.venv" ]] \
    || log "warning: no $ROOT/.venv and no ORT_DYLIB_PATH; run \`make setup\` if the server cannot load ONNX Runtime"
log "starting ${server[*]} serve on port $PORT (log: $SERVER_LOG)"
(cd "$ROOT" && exec "${server[@]}" serve --model "$MODEL_DIR" --served-model-name "$MODEL_NAME" \
    --quant "$QUANT" --host 127.0.0.1 --port "$PORT") >"$SERVER_LOG" 2>&1 &
server_pid=$!

deadline=$((SECONDS + READY_TIMEOUT))
until curl -fsS -o /dev/null "$BASE/ready" 2>/dev/null; do
    kill -0 "$server_pid" 2>/dev/null || { tail -n 30 "$SERVER_LOG" >&2; die "server exited before it was ready"; }
    ((SECONDS < deadline)) || { tail -n 30 "$SERVER_LOG" >&2; die "server not ready after ${READY_TIMEOUT}s"; }
    sleep 0.5
done
log "server ready: $(curl -fsS "$BASE/ready")"

# --- 3. lm_eval. -----------------------------------------------------------------------------------
# The task's data_files path is relative, so lm_eval runs from this directory.
# tokenizer_backend=None: no transformers/tiktoken tokenizer, prompts go out as strings (it also
# forces tokenized_requests=False); max_retries=1: a refused request fails the run at once.
model_args="model=$MODEL_NAME,base_url=$BASE/v1/completions,tokenizer_backend=None"
model_args+=",tokenized_requests=False,num_concurrent=$NUM_CONCURRENT,max_retries=1"
cmd=("$VENV/bin/lm_eval" run
    --model local-completions
    --model_args "$model_args"
    --include_path "$HERE/tasks"
    --tasks "$TASK"
    --limit "$LIMIT"
    --batch_size "$BATCH_SIZE"
    --output_path "$RUN_DIR"
    --log_samples)
log "running: ${cmd[*]}"
started=$SECONDS
set +e
(cd "$HERE" && export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 HF_HOME="$HERE/.cache/huggingface" \
    TOKENIZERS_PARALLELISM=false && "${cmd[@]}") 2>&1 | tee "$RUN_DIR/lm_eval.log"
rc=${PIPESTATUS[0]}
set -e
log "lm_eval exited with $rc after $((SECONDS - started))s"
((rc == 0)) || die "lm_eval failed (see $RUN_DIR/lm_eval.log and $SERVER_LOG)"

# --- 4. Check the results JSON. --------------------------------------------------------------------
results_json="$(find "$RUN_DIR" -name 'results_*.json' -print | sort | tail -n 1)"
[[ -n "$results_json" ]] || die "no results_*.json under $RUN_DIR"
"$VENV/bin/python" - "$results_json" "$TASK" "$METRIC" <<'EOF' || die "results JSON check failed: $results_json"
import json, math, sys
path, task, metric = sys.argv[1:]
res = json.load(open(path))["results"].get(task, {})
value = res.get(metric)
if not isinstance(value, (int, float)) or math.isnan(value):
    sys.exit(f"{task} has no numeric {metric!r} in {path}: {res}")
print(f"[lm_eval/run.sh] OK: {task} {metric} = {value} "
      f"(stderr {res.get(metric.replace(',', '_stderr,'))}) -> {path}")
EOF
