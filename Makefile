# Two commands on a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
# Each creates .venv on first use and installs the project with its test extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/digits

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits_end_to_end.py --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	@echo "see BENCHMARKS.md for the benchmark commands"

clean:
	rm -rf $(VENV) runs .pytest_cache
