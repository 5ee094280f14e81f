# onnx-chat: two commands set everything up on a fresh machine with Rust and Python 3.
#   make run    serve the default model (downloads it from the hub) — or `make run MODEL=tests/fixtures/tiny-gemma3n`
#   make test   the whole test suite (what CI runs)
# Both provision ./.venv (ONNX Runtime, nats-server, the OpenAI SDK) from requirements.txt first.

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
MODEL  ?= Gemma-3n-E2B-it-ONNX/Q4_MIXED
HOST   ?= 127.0.0.1
PORT   ?= 8000
CARGO_TEST_FLAGS ?=

.PHONY: setup run test build lint fmt bench fixtures clean-venv

setup: $(STAMP)

# Idempotent: re-runs only when requirements.txt changes or the venv is missing. docker-compose (to
# validate docker-compose.yml; no engine is needed) comes from Debian's packages when missing.
$(STAMP): requirements.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@command -v docker-compose >/dev/null || ./scripts/install-docker-compose.sh
	@touch $@

build:
	cargo build --release

run: setup
	cargo run --release -- serve --model "$(MODEL)" --host $(HOST) --port $(PORT)

# The binary and the tests find ONNX Runtime and nats-server in ./.venv by themselves. The stack tests
# (tests/compose.rs) need a Docker engine: scripts/docker-engine.sh installs/starts Debian's dockerd as
# root, or warns loudly that they will be skipped.
test: setup docker-engine
	cargo test -p onnx-chat-attention
	cargo test $(CARGO_TEST_FLAGS)

.PHONY: docker-engine images-offline stack-up stack-down
docker-engine:
	@./scripts/docker-engine.sh

# Base images (debian:bookworm-slim, python:3.11-slim-bookworm, rust:1.95-bookworm) made from Debian's
# packages with debootstrap + docker import, for machines without a container registry (needs root).
images-offline:
	./scripts/images-offline.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

# Regenerate the committed test model and goldens (needs ~3 GB of torch wheels; never run in CI).
fixtures:
	tools/fixtures/generate.sh
	tools/fixtures/smolvlm/generate.sh
	tools/fixtures/granite_vision/generate.sh

clean-venv:
	rm -rf $(VENV)

# Benchmarks (not run by CI; see BENCHMARKS.md). `make bench-model` generates the bench-size random Gemma-3n once
# (~1.1 B parameters, fp32 + _quantized + _q4, ~8 GB on disk, ~25 min on 2 cores; needs the fixture generator's
# venv, created when missing). `make bench` then prints one table: onnx-chat vs the Python onnxruntime loop, media
# preprocessing vs transformers, NATS vs in-process latency, 1 vs 2 workers. BENCH_ARGS are passed to
# tools/bench/bench.py (e.g. BENCH_ARGS="--quants Q4_MIXED --repeats 5 --sections gen").
BENCH_MODEL ?= target/bench-model/bench-gemma3n
BENCH_ARGS  ?=

.PHONY: bench-model
bench-model: $(BENCH_MODEL)/.complete

$(BENCH_MODEL)/.complete:
	tools/bench/make_bench_model.sh $(BENCH_MODEL)

# Model load from a plain folder and from a Hugging Face cache snapshot: time to ready and peak RSS
# (BENCHMARKS.md, run L). LOAD_ARGS go to tools/bench/load_bench.py, e.g. LOAD_ARGS="--old-bin /tmp/onnx-chat-old".
LOAD_ARGS ?=
.PHONY: bench-load
bench-load: setup $(BENCH_MODEL)/.complete
	cargo build --release
	$(VENV)/bin/python tools/bench/load_bench.py --model $(BENCH_MODEL) $(LOAD_ARGS)

bench: setup
	@test -f $(BENCH_MODEL)/.complete || echo "note: $(BENCH_MODEL) missing (make bench-model): tiny-model rows only"
	cargo build --release
	$(VENV)/bin/python tools/bench/bench.py --model $(BENCH_MODEL) $(BENCH_ARGS)

# onnx-chat side by side with llama.cpp's llama-server on the bench model (BENCHMARKS.md, run P): builds llama.cpp
# from the sources vendored in a pinned llama-cpp-python sdist (PyPI) into target/peer/, converts the bench model
# to GGUF (f16 -> Q4_0, Q4_K_M; tools/bench/peer_setup.sh, ~15 min the first time), then times both servers over
# HTTP (tools/bench/peer.py, ~30-40 min on 2 cores). PEER_ARGS go to peer.py, e.g.
# PEER_ARGS="--contexts 32,2000 --repeats 1 --llama Q4_K_M:no-repack".
PEER_ARGS ?=
.PHONY: bench-peer
bench-peer: setup $(BENCH_MODEL)/.complete
	cargo build --release
	tools/bench/peer_setup.sh $(BENCH_MODEL)
	$(VENV)/bin/python tools/bench/peer.py --model $(BENCH_MODEL) $(PEER_ARGS)

# One attention node timed alone: ONNX Runtime's GroupQueryAttention against onnx-chat's own kernel
# (src/engine/attention.rs), decode steps and prefill chunks at 32-8 000 positions (BENCHMARKS.md, run N).
.PHONY: bench-attention
bench-attention: setup
	$(VENV)/bin/python tools/bench/attention_kernel.py

# The browser test of the chat page (tests/ui_browser.rs) needs Debian's chromium and playwright-core
# (pinned in tests/ui/package-lock.json, installed into tests/ui/node_modules); `make test` installs them.
.PHONY: ui-deps test-ui
test: ui-deps
ui-deps:
	@./scripts/install-chromium.sh

test-ui: setup ui-deps
	cargo test --test ui_browser

# The cost of constrained decoding (benches/grammar.rs, BENCHMARKS.md run G): mask time per step on the tiny
# vocabulary and on a real 200k one (OpenAI's o200k_base from the npm package gpt-tokenizer, converted by
# tools/bench/tiktoken_vocab.py), and decode ms/token with and without a JSON schema on the bench model (or on
# the tiny model when the bench model is missing).
BENCH_VOCAB := target/bench-vocab/o200k/tokenizer.json
GRAMMAR_MODEL := $(if $(wildcard $(BENCH_MODEL)/.complete),--vocab $(BENCH_MODEL)/tokenizer.json --model $(BENCH_MODEL) --quant Q4_MIXED,--model tests/fixtures/tiny-gemma3n --quant FP32)

.PHONY: bench-grammar
bench-grammar: setup $(BENCH_VOCAB)
	cargo bench --bench grammar -- --vocab tests/fixtures/tiny-gemma3n/tokenizer.json --vocab $(BENCH_VOCAB) $(GRAMMAR_MODEL)

$(BENCH_VOCAB):
	mkdir -p target/bench-vocab/o200k
	cd target/bench-vocab && npm pack --silent gpt-tokenizer@4.0.0 >/dev/null && tar xzf gpt-tokenizer-4.0.0.tgz
	$(PYTHON) tools/bench/tiktoken_vocab.py target/bench-vocab/package/data/o200k_base.tiktoken $@
