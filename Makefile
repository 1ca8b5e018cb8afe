# Two commands for a newcomer:
#   make demo   create .venv, install, run the whole job on generated demo data (CPU, minutes)
#   make test   create .venv, install, run the whole test suite
# and the inner loop while changing code:
#   make check  ruff (lint + format check) and the fast tests: those not marked slow (tests/conftest.py)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check bench lint clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The install's wall time is printed before the demo's own per-step table (0 s once .venv is there).
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory $(STAMP) && \
	  echo "install: $$(( $$(date +%s) - start )) s (make demo: installing .venv when missing)"
	$(PY) ray_jobs/demo.py

test: $(STAMP) browser
	$(PY) -m pytest -q

check: lint
	$(PY) -m pytest -q -m "not slow"

# Headless Chromium for the viewer's browser test (tests/test_viewer.py): Debian's package, installed when
# missing and running as root; otherwise (or when apt-get fails) that test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq chromium) || echo "browser: apt-get could not install chromium"; \
	  else echo "browser: no chromium and not root: the viewer's browser test will be skipped"; fi; }

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ichmodel ray_jobs search_spaces tests bench
	$(VENV)/bin/ruff format --check ichmodel ray_jobs search_spaces tests bench

clean:
	rm -rf runs demo_output .pytest_cache
