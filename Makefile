# ExecGuard: `make run` sets up and starts the gateway; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= .execguard
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: run test lint bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/execguard init --data $(DATA)
	$(BIN)/execguard serve --data $(DATA) --host $(HOST) --port $(PORT)

test: install-test
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check src tests bench

bench: install-test
	$(BIN)/python bench/execute.py --rounds 2 --db auto
	$(BIN)/python bench/decision.py
	$(BIN)/python bench/audit.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
