# Two commands on a fresh machine: `make run` and `make test`. Both build .venv/ when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
CODE   := arks extproc ratelimit controller launcher tests

.PHONY: run test unit integration chaos bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/arks up $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/integration tests/chaos

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

# The adversarial suite (also part of `make test`), recording its figures into docs/reliability.md;
# the doc is rendered also when an attack failed, then the target fails.
CHAOS_FIGURES := .arks/chaos-figures.jsonl
chaos: $(STAMP)
	rm -f $(CHAOS_FIGURES)
	ARKS_CHAOS_FIGURES=$(CHAOS_FIGURES) $(PY) -m pytest -q tests/chaos $(ARGS); status=$$?; \
	$(PY) -m tests.chaos.report $(CHAOS_FIGURES) --out docs/reliability.md --command "make chaos"; \
	exit $$status

bench: $(STAMP)
	$(PY) -m tests.bench.gateway --out docs/benchmarks.md $(ARGS)

# ruff (rules and formatting), the layers of docs/architecture.md (import-linter), mypy --strict.
lint: $(STAMP)
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .arks .pytest_cache .mypy_cache .ruff_cache *.egg-info
