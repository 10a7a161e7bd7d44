# slimserve: `make run` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: run example test lint unit system-deps bench gpu-check clean

# torch is pinned to 2.13.0 (the CPU wheel); installing it first keeps any later resolution from
# pulling a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -e '.[torch,dev]'
	$(PIP) install --quiet --disable-pip-version-check --no-deps onnx2torch==1.5.15  # see pyproject.toml
	touch $(STAMP)

# The service on its embedded defaults: SQLite and artifacts under ./var, one in-process worker,
# http://127.0.0.1:8000 (OpenAPI page at /docs).
run: $(STAMP)
	$(VENV)/bin/slimserve serve

# Offline: train a small CNN on scikit-learn's digits, export it, optimize it, print before/after.
example: $(STAMP)
	$(PY) examples/digits_cnn.py var/example

# Debian's PostgreSQL server for the Postgres and scale-out tests (they skip, saying why, without it).
system-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } || \
	  echo "note: could not install PostgreSQL; the Postgres tests will be skipped"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: $(STAMP) system-deps
	$(PY) -m pytest -q

test: lint unit

bench: $(STAMP)
	$(PIP) install --quiet --disable-pip-version-check -e '.[torch,dev,bench]'
	$(PY) bench/optimizer_bench.py --out bench/results
	$(PY) bench/service_bench.py --out bench/results/service.json
	$(PY) bench/serving_bench.py --out bench/results/serving.json

gpu-check: $(STAMP)
	bash scripts/gpu-check

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
