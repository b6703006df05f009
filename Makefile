# fapc developer targets. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out/gpu-check

.DEFAULT_GOAL := help

# open3d's import needs libusb-1.0 (Debian: libusb-1.0-0): install it as root with apt, else say how.
define ENSURE_LIBUSB
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
    echo "installing libusb-1.0-0 (needed by open3d)"; \
    apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1 || \
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1; } || \
    echo "warning: could not install libusb-1.0-0; open3d features will be unavailable"; \
  else echo "note: open3d needs libusb-1.0: run 'sudo apt-get install -y libusb-1.0-0'"; fi; \
fi
endef
SHELL := /bin/bash
.PHONY: help install demo test lint bench validate gpu-check clean

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(ENSURE_LIBUSB)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,e57]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install fapc with test tools and E57 input

demo: $(STAMP) ## run `fapc normals` on sample_data/ (writes out/demo/)
	$(VENV)/bin/fapc normals sample_data -o out/demo/ --overwrite

test: $(STAMP) ## run the test suite (CPU; CUDA tests skip without a GPU)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP) ## ruff check
	$(VENV)/bin/ruff check fapc tests

bench: $(STAMP) ## speed + accuracy benchmarks (reads ../shared/data when present)
	$(PY) -m fapc.bench all

validate: $(STAMP) ## TRAIN-only model selection (MODEL=, BASELINE=report.json; reads ../shared/data)
	$(PY) -m fapc.validate $(if $(MODEL),--model $(MODEL)) $(if $(BASELINE),--baseline $(BASELINE)) --json $(or $(JSON),out/validate.json)

gpu-check: ## on a GPU host without .venv: CUDA tests + 1M/10M benchmark, logs in OUT
	@mkdir -p $(OUT)
	set -o pipefail; PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee $(OUT)/cuda-tests.log
	set -o pipefail; PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(PYTHON) -m fapc.gpu_check --out $(OUT) 2>&1 | tee $(OUT)/gpu-check.log

clean: ## remove build outputs (keeps .venv)
	rm -rf out build dist *.egg-info .pytest_cache .ruff_cache
