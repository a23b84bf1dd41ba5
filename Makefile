# fedsilo: `make demo` and `make test` work on a fresh clone (they set up .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU machines get the CPU wheel of torch (never the multi-GB CUDA build).
# GPU sites: `make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip config lists local indexes that pip warns about: hide that noise only.
QUIET  := sed -u '/^WARNING: Location .* is ignored/d'

.PHONY: setup demo test test-fast lint typecheck bench clean gpu-kit

# The installer is uv (Flower depends on it anyway): the same packages pip resolves, from
# the same places (pip's find-links and extra indexes, from its config or PIP_* variables),
# compiled to bytecode as pip does, in ~35 s instead of ~85 s on a fresh machine. Where uv
# fails, pip installs instead.
UV     := $(VENV)/bin/uv
UV_ENV  = UV_FIND_LINKS="$${PIP_FIND_LINKS:-$$($(PIP) config get global.find-links 2>/dev/null)}" \
          UV_EXTRA_INDEX_URL="$${PIP_EXTRA_INDEX_URL:-$$($(PIP) config get global.extra-index-url 2>/dev/null)}" \
          UV_INDEX_STRATEGY=unsafe-best-match UV_COMPILE_BYTECODE=1
# The example task (README, "Bring your own task"): the test suite runs it.
PACKAGES := -e '.[dev]' -e examples/breast_cancer

$(STAMP): pyproject.toml examples/breast_cancer/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q uv 2>&1 | $(QUIET)
	$(UV_ENV) $(UV) pip install -q --python $(PY) $(TORCH_SPEC) \
	  && $(UV_ENV) $(UV) pip install -q --python $(PY) $(PACKAGES) \
	  || { echo "uv could not install; pip instead"; \
	       $(PIP) install -q $(TORCH_SPEC) 2>&1 | $(QUIET) && $(PIP) install -q $(PACKAGES) 2>&1 | $(QUIET); }
	$(PY) -c "import fedsilo, torch, flwr, opacus; print('fedsilo ready: torch', torch.__version__, 'flwr', flwr.__version__, 'opacus', opacus.__version__)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsilo simulate

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 3 --dist load --maxschedchunk 1  # order: tests/conftest.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	mkdir -p build/typecheck && ln -sfn ../.. build/typecheck/fedsilo
	cd build/typecheck && MYPYPATH=. ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p fedsilo

# Benchmarks (bench/, not part of the package): each prints a Markdown table and writes
# bench/results/NAME.json. `make bench` runs all at their default sizes (tens of minutes
# on 2 CPU cores; utility is the long one): run one with `$(PY) -m bench.NAME --help`.
BENCHES ?= dp_throughput federation_overhead deploy_latency scale utility
bench: $(STAMP)
	mkdir -p bench/results
	set -e; for b in $(BENCHES); do echo "== bench.$$b"; $(PY) -m bench.$$b; done

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache .mypy_cache .ruff_cache

# The wheels bench/gpu_check.sh installs, offline, on a GPU machine that has PyTorch:
# fedsilo's DP path's needs beyond it, at this venv's versions, for CPython $(GPU_PY).
GPU_PY ?= 3.12
gpu-kit: $(STAMP)
	rm -rf .gpu-kit && mkdir -p .gpu-kit
	$(PIP) download -q --no-deps --only-binary=:all: -d .gpu-kit --python-version $(GPU_PY) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 \
	  $$($(PY) -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in ('opacus', 'cryptography', 'cffi', 'pycparser')))")
	ls .gpu-kit
