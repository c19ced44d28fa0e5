# Two commands do everything (see README): `make optimize` and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install optimize test lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 (a plain `torch` would download a CUDA build of several GB).
	$(BIN)/pip install -q torch==2.13.0
	# The `local` extra may build llama-cpp-python from source: about 6 minutes on 2 cores.
	$(BIN)/pip install -q -e ".[local,embeddings,dask,dev]"
	touch $@

install: $(BIN)/.installed

optimize: install
	# Data caps keep MIPROv2 light on the 135M local model to about 4.5 minutes on 2 cores.
	$(BIN)/dspyflow optimize --task intent --optimizer mipro --budget light --lm local \
		--max-train 40 --max-val 20 --max-test 40

test: install
	./scripts/ensure-services.sh
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
