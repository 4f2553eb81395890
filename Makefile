# The two commands of the README:
#   make bench   set up .venv and run the main job (effattn bench on this machine's hardware -> bench-out/)
#   make test    set up .venv and run the whole test suite (CPU: Triton kernels through its interpreter)
VENV ?= .venv
PY := $(VENV)/bin/python
# Triton 3.6 is what the GPU image has; its interpreter breaks on numpy >= 2.3.
PINS := "triton==3.6.0" "numpy<2.3" "pytest>=7" "pytest-xdist>=3" "matplotlib>=3.7"
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH := $(if $(HAS_GPU),torch,torch==2.13.0)
JOBS ?= 2

.PHONY: setup bench test check list clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" $(PINS)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

bench: setup
	$(VENV)/bin/effattn bench --out bench-out

test: setup
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile tests

check: setup
	$(VENV)/bin/effattn check

list: setup
	$(VENV)/bin/effattn list

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
