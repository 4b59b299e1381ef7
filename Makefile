# Two commands do all set-up on a fresh machine (see README):
#   make demo   the whole platform end to end on this machine (local Ray, bundled tiny model)
#   make test   ruff check + ruff format --check + pytest
# Both create .venv and install the pinned stack once; a second run installs nothing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | md5sum | cut -c1-12)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test lint format demo clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first: deepspeed builds against it (no build isolation, so no second torch).
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pipelines.prebuild
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	$(VENV)/bin/dcm demo

clean-runs:
	rm -rf runs
