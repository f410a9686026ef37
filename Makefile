# Two commands on a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
# Each creates .venv on first use and installs the project with its test extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/digits

.PHONY: demo test typecheck install bench clean

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

# mypy on the TensorRT code against tensorrt-stubs. The stubs package depends on `tensorrt`, whose libs
# download from NVIDIA's own index at install time, so it is installed without dependencies (its .pyi
# files are all mypy reads); tools/prepare_trt_stubs.py makes them visible to mypy (see its docstring).
TRT_STUBS ?= tensorrt-stubs==10.13.0.35.1
TYPECHECKED = deploycompress_device deploycompress/backends/tensorrt.py deploycompress/export/tensorrt_checks.py \
	deploycompress/export/fp16.py deploycompress/bundle/tensorrt_portable.py deploycompress/engine_tensorrt.py
typecheck: $(STAMP)
	$(PY) -m pip install --quiet -e '.[typecheck]'
	$(PY) -m pip install --quiet --no-deps '$(TRT_STUBS)'
	$(PY) tools/prepare_trt_stubs.py .typecheck/stubs
	$(PY) -m mypy $(TYPECHECKED)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	@echo "see BENCHMARKS.md for the benchmark commands"

clean:
	rm -rf $(VENV) runs .pytest_cache .typecheck .mypy_cache
