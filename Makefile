# Two commands do all set-up on a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create (or reuse) the virtualenv $(VENV) and install what they need into it.
#
# TORCH_SPEC picks the torch build. The default is the CPU build torch==2.13.0; GPU users override it,
# e.g. `make test TORCH_SPEC='torch>=2.9'` (a CUDA build from the registry's default index). It is passed to
# pip unquoted, so extra pip options may follow the requirement.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.orthoptim-installed

.PHONY: demo test test-fast lint doctor venv clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/orthoptim demo

doctor: $(STAMP)
	$(BIN)/orthoptim doctor

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks examples)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks examples)
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks examples)
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The edit loop: everything but the tests marked slow (under a minute on 2 cores), stopping at the first failure.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

# The integration tier: installs the `integrations` extra (transformers, accelerate, lightning, by name) into
# $(VENV), then runs tests/integrations (skipped by `make test` where those are not installed) with the tests of
# the chained clip and of the integrations' import errors.
INTEGRATIONS_STAMP := $(VENV)/.orthoptim-integrations-installed

$(INTEGRATIONS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,integrations]"
	@touch $(INTEGRATIONS_STAMP)

.PHONY: test-integrations
test-integrations: $(INTEGRATIONS_STAMP)
	$(BIN)/python -m pytest -q tests/integrations tests/test_clip_chained.py tests/test_integrations_import.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache .hypothesis
