# The set-up commands: `make demo`, `make serve`, `make test` and `make coverage` (the full matrix, ~1 h on 2 cores). Each installs what it needs into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo serve bench coverage mutants clean

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

# the OpenAI-compatible service on the embedded digits model, 2 ranks sharing the CFG branches;
# e.g. `make serve SERVE_ARGS="--plan dp=2 --port 9000"`
SERVE_ARGS ?= --plan cfg=2
serve: $(STAMP)
	$(BIN)/xdit-fx serve $(SERVE_ARGS)

# every zoo model (diffusers classes + from-scratch DiTs) under ulysses=2 and ring=2 (one 2-process spawn),
# a diverse subset under ulysses=2,ring=2 (4 processes on 2 cores are slow), both cache kinds in one process
# (the repeated call must skip), pipefusion=2 (2 processes); then COVERAGE.md from all of them
USP_MODELS := scratch_dit,scratch_mmdit,scratch_mha_uvit,scratch_manual_video,anyflow_far,hunyuan_dit,ace_step,helios,nucleus_moe_image_moe,ideogram4,wan_vace,ltx2_video,stable_audio3,bria_fibo2,qwen_image,z_image,latte,sana,sana_video,qwen_image21,cosmos3_omni,flux,sd3
coverage: $(STAMP)
	mkdir -p .scratch
	$(BIN)/xdit-fx coverage --plan ulysses=2 --plan ring=2 --jsonl coverage/COVERAGE.jsonl --out .scratch/coverage-2.md
	$(BIN)/xdit-fx coverage --plan ulysses=2,ring=2 --models $(USP_MODELS) --jsonl coverage/COVERAGE-usp.jsonl --out .scratch/coverage-4.md
	$(BIN)/xdit-fx coverage --plan cache=fbc:1e9 --plan cache=teacache:1e9 --jsonl coverage/COVERAGE-cache.jsonl --out .scratch/coverage-cache.md
	$(BIN)/xdit-fx coverage --plan pipefusion=2 --jsonl coverage/COVERAGE-pipefusion.jsonl --out .scratch/coverage-pipefusion.md
	$(BIN)/xdit-fx coverage --report-only coverage/COVERAGE.jsonl coverage/COVERAGE-usp.jsonl coverage/COVERAGE-cache.jsonl coverage/COVERAGE-pipefusion.jsonl --out coverage/COVERAGE.md

# plant each known bug of scripts/mutants.py in a copy of the tree and run the tests that must catch it
# (~30 min on 2 cores); writes .scratch/mutants.md, exit 1 if any survived
mutants: $(STAMP)
	mkdir -p .scratch
	$(BIN)/python scripts/mutants.py --out .scratch/mutants.md

bench: $(STAMP)
	$(BIN)/python benchmarks/sequence_parallel_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
