# lmforge: `make demo` and `make test` work on a fresh clone with only Python 3 installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-all lint format bench clean

setup: $(STAMP)

# torch first, pinned: the CPU build lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/lmforge demo --out $(DEMO_OUT) --overwrite  # a rerun redoes the last demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -n 2

test-all: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -n 2 -m ''

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/parity.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/models.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/train_step.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/decode.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/prepare.py --repeat 5
	HF_HUB_OFFLINE=1 $(BIN)/python bench/governance.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serve.py
	$(BIN)/pip install -q -e '.[bench]'  # TRL, for bench/finetune.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/finetune.py --threads 1

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
