# Set-up and entry points. Every target creates/uses .venv, so a fresh clone needs nothing else.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out/tiny
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: setup demo test bench bench-scale bench-peer bench-flat clean

# TensorRT's Python plugin layer (tensorrt.plugin) for the plugin harness: the first release of
# tests/tensorrt_releases.txt is installed, the others downloaded as wheels. --no-deps: its libraries
# (tensorrt-cu12-libs) are placeholders on the registry, and the harness needs only the Python part.
TRT_RELEASES := $(shell grep -v '^\#' tests/tensorrt_releases.txt)
TRT_WHEELS   := $(VENV)/tensorrt-releases

$(STAMP): pyproject.toml Makefile tests/tensorrt_releases.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel packaging
	# the CPU build of torch, from local disk; a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,gpu]'
	$(PY) -m pip install -q --no-deps tensorrt-cu12-bindings==$(firstword $(TRT_RELEASES))
	# a release that cannot be downloaded only makes its own harness tests skip (they say which)
	@for v in $(wordlist 2,99,$(TRT_RELEASES)); do \
	  ls $(TRT_WHEELS)/tensorrt_cu12_bindings-$$v-*.whl >/dev/null 2>&1 \
	    || $(PY) -m pip download -q --no-deps -d $(TRT_WHEELS) tensorrt-cu12-bindings==$$v \
	    || echo "tensorrt-cu12-bindings==$$v could not be downloaded: its plugin-harness tests will skip"; \
	done
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
	$(VENV)/bin/jambatrt profile $(OUT) --backend ort --lengths 1,4096 --repeats 2 \
	    --report $(OUT)/reports/profile.json --plot $(OUT)/reports/profile.png
	$(VENV)/bin/jambatrt generate $(OUT) --backend ort --prompt-ids 1,2,3 --max-new-tokens 16
	@echo "parity report:  $(OUT)/reports/parity.json (summary $(OUT)/reports/parity.md, plots parity.*.png)"
	@echo "profile report: $(OUT)/reports/profile.json (plot $(OUT)/reports/profile.png)"

test: setup serve-setup
	$(PY) -m pytest -q

# Kernel and engine benchmarks (pytest -m bench -> bench/*.json), then the 262,144-token sweep on the
# bench preset: JSON, markdown and PNG under bench/ (generated, never committed).
bench: setup
	$(PY) -m pytest -q -s -m bench -p no:cacheprovider
	$(VENV)/bin/jambatrt export --preset bench -o bench/artifact --force
	$(VENV)/bin/jambatrt build bench/artifact --backend ort
	$(VENV)/bin/jambatrt validate bench/artifact --backend ort --lengths 1,4096,65536,262144 --report bench/parity.json
	$(VENV)/bin/jambatrt profile bench/artifact --backend ort --lengths 1,4096,65536,262144 \
	    --report bench/profile.json --plot bench/profile.png

# Export, ORT build and validate of a 7.4 GB checkpoint with Jamba-1.5-Mini's dimensions (2 layers), each
# stage's peak private memory against its bound (~20 GB of disk while it runs, removed after; --keep keeps it)
bench-scale: setup
	$(PY) -m jambatrt.validate.scale --dir bench/scale

# The ORT engine against llama.cpp on the same checkpoint (preset `peer`), interleaved rounds: builds llama.cpp
# once from the llama-cpp-python sdist into build/peer (kept by `make clean`), GGUF F32 + Q8_0, logits check,
# decode per token at 1K..64K of context;
# bench/peer/peer.{json,md,png}. Not part of `make test`. PEER_ARGS="--rounds 2 --lengths 512,4096" for less.
bench-peer: setup
	$(PY) -m pip install -q sentencepiece
	$(PY) -m jambatrt.validate.peer --out bench/peer --cache build/peer $(PEER_ARGS)

# Decode per-token time at 1K..64K of context on the bench preset, the contexts interleaved step by step
# (one engine per context in one process): bench/decode-flat-$(KV_CACHE).json. KV_CACHE=int8 for the
# int8 KV cache. Not part of `make test`.
KV_CACHE ?= float32
bench-flat: setup
	$(VENV)/bin/jambatrt export --preset bench -o bench/flat-art --force
	$(VENV)/bin/jambatrt build bench/flat-art --backend ort --kv-cache $(KV_CACHE)
	$(PY) -m jambatrt.validate.decode_flat bench/flat-art --report bench/decode-flat-$(KV_CACHE).json

clean:
	rm -rf out bench .pytest_cache .numba_cache

# ---- serving (issue 8): tritonserver + its Python backend need numpy < 2, the main .venv has numpy 2,
# so the server side gets its own env. The server is part of the product: a failure fails this target
# (and so `make test`), unless pip's log shows the package registry unreachable -- then the reason is
# recorded as "registry outage: ..." and the deploy tests skip saying so (issue 15, item 10;
# jambatrt.deploy.server.find_serve_env reads the marker).
SERVE_VENV  ?= .venv-serve
SERVE_PY    := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.installed
SERVE_FAIL  := $(SERVE_VENV)/.serve-setup-failed
# what pip prints when it cannot reach the registry at all (not: a version that does not exist)
REGISTRY_DOWN := NewConnectionError|ConnectTimeoutError|ReadTimeoutError|Temporary failure in name resolution|Name or service not known|Network is unreachable|Connection refused|Connection reset by peer|Max retries exceeded|Could not fetch URL|HTTP error 50[234]|50[234] Server Error

.PHONY: serve-setup
serve-setup: $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml Makefile $(STAMP)
	@mkdir -p $(SERVE_VENV) && echo '*' > $(SERVE_VENV)/.gitignore && rm -f $(SERVE_FAIL)
	@log=$(SERVE_VENV)/setup.log; : > $$log; \
	run() { printf '\n== %s\n' "$$*" >> $$log; "$$@" >> $$log 2>&1; }; \
	{ test -x $(SERVE_PY) || run python3 -m venv $(SERVE_VENV); } \
	  && run $(SERVE_PY) -m pip install -q --upgrade pip setuptools wheel \
	  && run $(SERVE_PY) -m pip install -q 'numpy<2' torch==2.13.0 \
	  && run $(SERVE_PY) -m pip install -q -e '.[serve]' 'numpy<2' \
	  && run $(SERVE_PY) -m pip check \
	  && run $(PY) -m pip install -q 'tritonclient[http]' \
	  && touch $@ && echo "serve env ready: $(SERVE_VENV) (numpy<2, nvidia-pytriton, jambatrt editable)" \
	  || { if grep -qE "$(REGISTRY_DOWN)" $$log; then kind="registry outage"; else kind="failed"; fi; \
	       { grep '^== ' $$log | tail -1 | sed "s/^== /$$kind: /"; grep -v -e 'is ignored' -e '^== ' $$log | tail -4; } \
	         > $(SERVE_FAIL); \
	       if [ "$$kind" = "registry outage" ]; then \
	         echo "serve-setup: the package registry is unreachable (the deploy tests will skip and say so): $$(cat $(SERVE_FAIL))"; \
	       else echo "serve-setup FAILED: $$(cat $(SERVE_FAIL))" >&2; exit 1; fi; }
