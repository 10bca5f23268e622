# Two entry points for a fresh machine (see README.md):
#   make demo   installs the tool and runs it on its embedded default
#   make test   installs everything (system packages too) and runs lint, types and the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint pytest install dev system-deps bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

system-deps:
	bash scripts/system-deps.sh

demo: install
	bash scripts/system-deps.sh gpg
	$(BIN)/ibkr-statements demo

LINTED := statements tests $(wildcard bench)

lint: dev
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy --strict statements

pytest: dev system-deps
	$(BIN)/pytest

test: system-deps dev lint pytest

bench: system-deps dev
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
