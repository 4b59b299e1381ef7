# Two commands do all set-up on a fresh machine (see README):
#   make demo   the whole platform end to end on this machine (local Ray, bundled tiny model)
#   make test   ruff check + ruff format --check + pytest
# Both create .venv and install the pinned stack once; a second run installs nothing.
# `make test` also needs Chromium for the Serve page tests: it installs the Debian package
# when it is missing and the user may install (root, or password-less sudo), else says what
# to install and stops.
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
CHROMIUM := /usr/bin/chromium
APT_LOG := $(CURDIR)/.cache/apt-chromium.log

.PHONY: install test lint format demo clean-runs browser student

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

# Headless Chromium drives the Serve page in tests/test_serve_ui.py (no browser download).
browser:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else SUDO=none; fi; \
	if [ "$$SUDO" = none ] || ! command -v apt-get >/dev/null; then \
	  echo "make test needs Chromium at $(CHROMIUM) for the Serve page tests: install the Debian package 'chromium' (sudo apt-get install chromium), then run make test again."; \
	  exit 1; \
	fi; \
	echo "Installing Chromium for the Serve page tests (Debian packages; log in $(APT_LOG))"; \
	mkdir -p $(dir $(APT_LOG)); \
	{ $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver; } \
	  >$(APT_LOG) 2>&1 && [ -x $(CHROMIUM) ] || \
	  { echo "Installing Chromium failed; see $(APT_LOG)."; exit 1; }

test: lint browser
	$(PY) -m pipelines.prebuild
	$(VENV)/bin/pytest -q --durations=25

demo: $(STAMP)
	$(VENV)/bin/dcm demo

clean-runs:
	rm -rf runs

# Rebuild the bundled distilled student dcm/shapes/student ('bundled:shapes-dcm'): about
# 31 minutes on 2 CPU cores (shared with other jobs); resumes an interrupted build from runs/student.
student: $(STAMP)
	$(PY) -m pipelines.prebuild
	$(PY) -m pipelines.student --work runs/student --out dcm/shapes/student
