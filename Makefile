# The two README commands: `make run` and `make test`. Both create/reuse a virtual environment
# installed from the lock file of the interpreter they find (requirements/py3XX.lock, exact
# versions with hashes). Another interpreter: `make test PYTHON=python3.12 VENV=.venv312`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PY_TAG := $(shell $(PYTHON) -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
LOCK := requirements/$(PY_TAG).lock
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# where PyTorch's CPU wheel (py311.lock) is not on the machine.
PIP_ARGS ?=
# pytest arguments: `make test-one PYTEST_ARGS='-m "not slow"'` runs the fast suite.
PYTEST_ARGS ?=
# The second interpreter of `make test` (the newest locked stack): pyenv's 3.12 or python3.12 on
# PATH, whichever runs.
PYTHON312 ?= $(shell for p in $(HOME)/.pyenv/versions/3.12*/bin/python $$(command -v python3.12); do \
  $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo $$p && break; done)
UV_VERSION := 0.13.9

.PHONY: install test test-one test-py312 run bench lock

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps $(PIP_ARGS) -r $(LOCK)
	$(BIN)/pip install -q --no-deps $(PIP_ARGS) -e .
	$(BIN)/pip check
	touch $(STAMP)

$(LOCK):
	@echo "no lock file $(LOCK) for $$($(PYTHON) --version); locks exist for: $$(ls requirements/*.lock | xargs -n1 basename)." >&2
	@echo "use one of those interpreters (make test PYTHON=python3.12), or install the ranges: pip install -e '.[test]'" >&2
	@exit 2

# `make test` (what CI runs): the full suite on $(PYTHON), then the fast suite (-m "not slow") on
# Python 3.12 with the newest locked stack, in .venv312. Without a Python 3.12 the second part is
# skipped with a notice (CI requires it).
test: test-one test-py312

test-one: install
	@echo "== pytest $(PYTEST_ARGS) on $$($(BIN)/jax-ensemble --version)"
	$(BIN)/pytest -q --durations=15 $(PYTEST_ARGS)

test-py312:
ifeq ($(PY_TAG),py312)
	@echo "== $(PYTHON) is Python 3.12 already: its suite ran above"
else ifeq ($(PYTHON312),)
	@echo "== no Python 3.12 found (PYTHON312=...): the fast suite on the newest stack is skipped" >&2
	@test -z "$(CI)" || (echo "CI needs Python 3.12" >&2; exit 2)
else
	$(MAKE) test-one PYTHON=$(PYTHON312) VENV=.venv312 PYTEST_ARGS='-m "not slow"'
endif

run: install
	$(BIN)/jax-ensemble run --config default

bench: install
	$(BIN)/python benchmarks/memory.py

# Regenerate both lock files from pyproject.toml: Python 3.11 takes every direct dependency at
# its floor (so the floors stay true), Python 3.12 the newest releases.
lock:
	test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q uv==$(UV_VERSION))
	.venv-lock/bin/uv pip compile pyproject.toml --extra test --python-version 3.11 --resolution lowest-direct \
	  --generate-hashes --constraint requirements/py311.constraints \
	  $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match) \
	  --custom-compile-command "make lock" -o requirements/py311.lock
	.venv-lock/bin/uv pip compile pyproject.toml --extra test --python-version 3.12 \
	  --generate-hashes --constraint requirements/py312.constraints \
	  --custom-compile-command "make lock" -o requirements/py312.lock
