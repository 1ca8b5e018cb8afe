# Two commands for a newcomer:
#   make demo   create .venv, install, run the whole job on generated demo data (CPU, minutes)
#   make test   create .venv, install, run the whole test suite
# and the inner loop while changing code:
#   make check  ruff (lint + format check) and the fast tests: those not marked slow (tests/conftest.py)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) ray_jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

check: lint
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ichmodel ray_jobs search_spaces tests bench
	$(VENV)/bin/ruff format --check ichmodel ray_jobs search_spaces tests bench

clean:
	rm -rf runs demo_output .pytest_cache
