# The set-up commands: `make demo`, `make test` and `make coverage` (the full matrix, ~1 h on 2 cores). Each installs what it needs into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench coverage clean

install: $(STAMP)

# torch first and pinned: `pip install torch==2.13.0` takes the CPU build on disk; a later
# `torch>=2.13` requirement is then already satisfied and pulls no CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/xdit-fx demo --nproc 2

# every zoo model (diffusers classes + from-scratch DiTs) under ulysses=2, ring=2 (2 processes) and
# ulysses=2,ring=2 (4 processes); writes COVERAGE.md and COVERAGE.jsonl
coverage: $(STAMP)
	$(BIN)/xdit-fx coverage --out COVERAGE.md

bench: $(STAMP)
	$(BIN)/python benchmarks/sequence_parallel_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
