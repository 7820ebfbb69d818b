# Set-up and entry points. Every target creates/uses .venv, so a fresh clone needs nothing else.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out/tiny
export OMP_WAIT_POLICY := PASSIVE
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel packaging
	# the CPU build of torch, from local disk; a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,gpu]'
	# mamba-ssm's reference functions are an independent oracle; no CUDA build (NOTES-ENV.md)
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PY) -m pip install -q --no-cache-dir \
	    --no-build-isolation --no-deps mamba-ssm || echo "mamba-ssm could not be installed: its oracle test will skip"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/jambatrt export --preset tiny -o $(OUT) --force
	$(VENV)/bin/jambatrt inspect $(OUT)
	$(VENV)/bin/jambatrt build $(OUT) --backend ort
	$(VENV)/bin/jambatrt validate $(OUT) --backend ort --lengths 1,17,4096 --report $(OUT)/reports/parity.json
	$(VENV)/bin/jambatrt generate $(OUT) --backend ort --prompt-ids 1,2,3 --max-new-tokens 16
	@echo "report: $(OUT)/reports/parity.json (summary: $(OUT)/reports/parity.md)"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pytest -q -m bench -p no:cacheprovider

clean:
	rm -rf out bench .pytest_cache .numba_cache
