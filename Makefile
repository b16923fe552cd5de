# Two entry points for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/quickstart

.PHONY: quickstart test test-all lint format install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.py
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.py
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: $(VENV)/.installed
	$(BIN)/warm-jax quickstart --workdir $(WORKDIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check warm_jax tests benchmarks launch
	$(BIN)/ruff format --check warm_jax tests benchmarks launch

format: $(VENV)/.installed-test
	$(BIN)/ruff format warm_jax tests benchmarks launch
	$(BIN)/ruff check --fix warm_jax tests benchmarks launch

test: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
