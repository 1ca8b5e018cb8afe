# Two commands for a newcomer:
#   make demo   create .venv, install, run the whole job on generated demo data (CPU, minutes)
#   make test   create .venv, install, run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) ray_jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ichmodel ray_jobs search_spaces tests bench
	$(VENV)/bin/ruff format --check ichmodel ray_jobs search_spaces tests bench

clean:
	rm -rf runs demo_output .pytest_cache
