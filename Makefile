# The two README commands: `make run` and `make test`. Both create/reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test run bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/pytest -q

run: install
	$(BIN)/jax-ensemble run --config configs/default.yaml

bench: install
	$(BIN)/python benchmarks/memory.py
