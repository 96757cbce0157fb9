# Two commands on a fresh machine: `make run` and `make test`. Both build .venv/ when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test unit integration bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/arks up $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/integration

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

bench: $(STAMP)
	$(PY) -m tests.bench.gateway --out docs/benchmarks.md $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check arks extproc ratelimit controller tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .arks .pytest_cache .mypy_cache .ruff_cache *.egg-info
