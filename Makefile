# The two commands of the quick start: `make demo` and `make test`.
# Each creates the virtual environment it needs on first use:
#   make test                      -> python3, virtualenv .venv
#   make test PYTHON=python3.13    -> that interpreter, virtualenv .venv-3.13
#   make test PYTHON=... VENV=dir  -> any interpreter, any virtualenv directory
# PYTHON may be a name on PATH, a path, or (with pyenv) a version pyenv has installed but
# not selected: pyenv's shim refuses those, so the interpreter is looked up under
# `pyenv root` instead.
ifeq ($(origin PYTHON),undefined)
PYTHON := python3
VENV ?= .venv
endif

# `X = $(eval X := ...)$(X)` runs the $(shell) once, on first use only: `make clean` or a
# target that never needs the interpreter does not start it.
PYTHON_EXE = $(eval PYTHON_EXE := $(shell \
	$(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
	ls -d "$$(pyenv root 2>/dev/null)"/versions/*/bin/$(PYTHON) 2>/dev/null | sort -V | tail -n 1))$(PYTHON_EXE)
PYTHON_VERSION = $(eval PYTHON_VERSION := $(if $(PYTHON_EXE),$(shell \
	$(PYTHON_EXE) -c 'import sys; print("%d.%d" % sys.version_info[:2])')))$(PYTHON_VERSION)
VENV ?= .venv-$(PYTHON_VERSION)
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

demo: $(STAMP)
	$(BIN)/lambda-pool demo

test: $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check lambda_pool tests samples benchmarks
	$(BIN)/ruff format --check lambda_pool tests samples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

$(STAMP): pyproject.toml
	$(if $(PYTHON_EXE),,$(error no Python interpreter '$(PYTHON)' found (on PATH or under pyenv); set PYTHON=/path/to/python3.X))
	@$(PYTHON_EXE) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "lambda-pool needs Python 3.10 or newer" or 0)'
	$(PYTHON_EXE) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
