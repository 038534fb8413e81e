# `make demo` and `make test` each build .venv (once) and run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to a matching pair (smp needs torchvision).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean-venv

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m iopfl_lightning fit --config experiments/demo.yaml

# One torch thread in tests: tiny nets gain nothing from two, and on a busy 2-core machine
# OpenMP spin-waiting made steps up to 20x slower.
test: $(STAMP)
	$(BIN)/ruff check iopfl_lightning tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check iopfl_lightning tests benchmarks

clean-venv:
	rm -rf $(VENV)
