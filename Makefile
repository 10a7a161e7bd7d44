# slimserve: `make run` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: run example test lint unit system-deps bench gpu-check clean container-test

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

# Debian's PostgreSQL server for the Postgres and scale-out tests, and Debian's Prometheus for the
# dashboard tests (they skip, saying why, without them).
system-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } || \
	  echo "note: could not install PostgreSQL; the Postgres tests will be skipped"
	@[ -x /usr/bin/prometheus ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
	  echo "note: could not install Prometheus; the dashboard and promtool tests will be skipped"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Two test processes, each taking whole files (module fixtures start their servers once): the suite
# waits on servers, workers and leases more than it computes: 10-13 min instead of 18 on 2 cores.
TEST_WORKERS ?= 2

unit: $(STAMP) system-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: lint unit container-test

bench: $(STAMP)
	$(PIP) install --quiet --disable-pip-version-check -e '.[torch,dev,bench]'
	$(PY) bench/optimizer_bench.py --out bench/results --markdown bench/results/optimizer.md
	$(PY) bench/service_bench.py --out bench/results/service.json --markdown bench/results/service.md
	$(PY) bench/serving_bench.py --out bench/results/serving.json --markdown bench/results/serving.md
	$(PY) bench/soak_bench.py --out bench/results/soak.json --markdown bench/results/soak.md
	$(PY) bench/make_results.py

gpu-check: $(STAMP)
	bash scripts/gpu-check

# Builds the CPU image from the Dockerfile with buildah and runs it: health, an upload, a job and an
# inference (scripts/container-smoke; about 6-10 min, 3 more the first time for the cached Debian base).
# buildah, podman and debootstrap come from apt-get when missing; if they cannot, this fails, it never skips.
container-test:
	@{ command -v buildah && command -v podman && command -v debootstrap; } >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends \
	      buildah podman debootstrap >/dev/null; } || \
	  { echo "container-test: cannot install buildah, podman and debootstrap (needs root and apt-get)" >&2; exit 1; }
	scripts/container-smoke

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
