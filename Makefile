# Every target sets up .venv itself on a fresh machine: `make run` and `make test` are
# the two commands the README promises.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast lint typecheck bench soak clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m scripts.demo

# Two test processes (pytest-xdist, one file per process at a time): the suite waits on
# real processes and databases more than it computes, and alone it took ~17 min of CI's
# 20. The PostgreSQL restart test stops the server every other test uses: it runs alone.
test: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not pg_restart"
	$(PY) -m pytest -q -p no:cacheprovider -m pg_restart

test-fast: install
	$(PY) -m pytest -q -x -m "not slow and not e2e"

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m ruff format --check .

typecheck: install
	$(PY) -m mypy

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

soak: install
	$(PY) -m scripts.soak --minutes 5
