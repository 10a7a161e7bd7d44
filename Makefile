# slimserve: `make run` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: run test lint unit bench gpu-check clean

# torch is pinned to 2.13.0 (the CPU wheel); installing it first keeps any later resolution from
# pulling a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -e '.[torch,dev]'
	touch $(STAMP)

# Until the service lands: train a small CNN on scikit-learn's digits, export it, optimize it.
run: $(STAMP)
	$(PY) examples/digits_cnn.py var/example

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q

test: lint unit

bench: $(STAMP)
	$(PIP) install --quiet --disable-pip-version-check -e '.[torch,dev,bench]'
	$(PY) bench/optimizer_bench.py --out bench/results

gpu-check: $(STAMP)
	bash scripts/gpu-check

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
