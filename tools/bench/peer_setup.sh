#!/usr/bin/env bash
# llama.cpp for the `peer` bench (tools/bench/peer.py): builds llama-server and llama-quantize from the llama.cpp
# sources vendored in a pinned PyPI sdist of llama-cpp-python (no prebuilt binaries), and converts the bench model
# to GGUF (f16, then Q4_0 and Q4_K_M). Everything goes under target/peer/ (git-ignored); each step is skipped when
# its output exists, so re-running is cheap.
#
#   target/peer/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp   sources
#   target/peer/build/bin/{llama-server,llama-quantize}         Release build (GGML_NATIVE, no curl/OpenSSL, no web UI download)
#   target/peer/venv                                            cmake, sentencepiece, gguf (vendored gguf-py); torch and
#                                                               transformers come from tools/fixtures/.venv (a .pth file)
#   target/peer/hf/bench-gemma3n                                the bench model's seeded weights as a transformers checkpoint
#   target/peer/gguf/bench-gemma3n-{f16,Q4_0,Q4_K_M}.gguf
#
# Checks on the way (peer_gguf.py): every text-decoder matrix of the checkpoint is found bit-exact in the ONNX fp32
# graphs of the bench model, and the f16 GGUF's matrices equal the checkpoint's rounded to f16.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
LCP_VERSION="${LCP_VERSION:-0.3.36}"   # llama-cpp-python 0.3.36 vendors llama.cpp 0c1e57098 (its CHANGELOG)
LLAMA_COMMIT="${LLAMA_COMMIT:-0c1e57098}"
MODEL="${1:-$ROOT/target/bench-model/bench-gemma3n}"
PEER="$ROOT/target/peer"
SRC="$PEER/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
BUILD="$PEER/build"
VENV="$PEER/venv"
FIX="$ROOT/tools/fixtures/.venv"
HF="$PEER/hf/bench-gemma3n"
OUT="$PEER/gguf"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$PEER" "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false \
       PYTHONWARNINGS=ignore OMP_NUM_THREADS="$JOBS"

if [ ! -f "$SRC/CMakeLists.txt" ]; then
    echo "== llama-cpp-python $LCP_VERSION sdist (PyPI) -> $PEER"
    (cd "$PEER" && python3 -m pip download -q --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LCP_VERSION" -d . && tar xzf "llama_cpp_python-$LCP_VERSION.tar.gz")
fi

# One patch (tools/bench/peer-llama-gemma3n-shared-kv.patch): llama.cpp's Gemma-3n loader hard-codes "the first 20
# layers have a KV cache" (true for E2B and E4B, 30/35 layers); it now takes n_layer - attention.shared_kv_layers
# from the GGUF, as its Gemma 4 loader already does, so the 15-layer bench model (10 KV layers) loads and shares KV
# like the transformers model (shared sliding layers reuse layer 8's cache, shared full layers layer 9's).
if [ ! -f "$SRC/.peer-patched" ]; then
    (cd "$SRC" && patch -p1 -N < "$HERE/peer-llama-gemma3n-shared-kv.patch")
    touch "$SRC/.peer-patched"
fi

if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.ok" ]; then
    test -x "$FIX/bin/python" || { echo "!! $FIX missing: run make bench-model (it creates the fixture venv)"; exit 1; }
    echo "== $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q cmake==3.31.6 sentencepiece==0.2.1 "$SRC/gguf-py"
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    fsite=$("$FIX/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$fsite" > "$site/zz-fixtures-venv.pth"   # torch, transformers, safetensors, onnx (after our own packages)
    touch "$VENV/.ok"
fi

if [ ! -x "$BUILD/bin/llama-server" ] || [ ! -x "$BUILD/bin/llama-quantize" ] || \
   [ "$SRC/src/models/gemma3n.cpp" -nt "$BUILD/bin/llama-server" ]; then
    echo "== building llama.cpp $LLAMA_COMMIT (llama-server, llama-quantize; Release, $JOBS jobs)"
    "$VENV/bin/cmake" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_COMMIT="$LLAMA_COMMIT" -DLLAMA_BUILD_NUMBER=0 > "$PEER/cmake-configure.log"
    "$VENV/bin/cmake" --build "$BUILD" --config Release -j "$JOBS" --target llama-server llama-quantize \
        > "$PEER/cmake-build.log" 2>&1 || { tail -30 "$PEER/cmake-build.log"; exit 1; }
fi

if [ ! -f "$OUT/bench-gemma3n-f16.gguf" ]; then
    if [ ! -f "$HF/.complete" ]; then
        echo "== bench model weights as a transformers checkpoint -> $HF"
        "$FIX/bin/python" "$HERE/make_bench_model.py" --hf-only "$HF"
        "$VENV/bin/python" "$HERE/peer_gguf.py" spm "$HF"
        touch "$HF/.complete"
    fi
    echo "== checkpoint vs the ONNX export ($MODEL)"
    "$VENV/bin/python" "$HERE/peer_gguf.py" verify-onnx "$HF" "$MODEL"
    echo "== convert_hf_to_gguf.py -> f16"
    "$VENV/bin/python" "$SRC/convert_hf_to_gguf.py" "$HF" --outtype f16 --outfile "$OUT/bench-gemma3n-f16.gguf.tmp" \
        > "$PEER/convert.log" 2>&1 || { tail -30 "$PEER/convert.log"; exit 1; }
    GGUF_PY="$SRC/gguf-py" "$VENV/bin/python" "$HERE/peer_gguf.py" verify-gguf "$HF" "$OUT/bench-gemma3n-f16.gguf.tmp"
    mv "$OUT/bench-gemma3n-f16.gguf.tmp" "$OUT/bench-gemma3n-f16.gguf"
fi

for q in Q4_0 Q4_K_M; do
    if [ ! -f "$OUT/bench-gemma3n-$q.gguf" ]; then
        echo "== llama-quantize $q"
        "$BUILD/bin/llama-quantize" "$OUT/bench-gemma3n-f16.gguf" "$OUT/bench-gemma3n-$q.gguf.tmp" "$q" "$JOBS" \
            > "$PEER/quantize-$q.log" 2>&1 || { tail -20 "$PEER/quantize-$q.log"; exit 1; }
        mv "$OUT/bench-gemma3n-$q.gguf.tmp" "$OUT/bench-gemma3n-$q.gguf"
    fi
done
ls -la "$OUT"
