# Two commands to set up and go (see README):
#   make repro   create .venv, install, write params.yaml from conf/, regenerate every output with
#                `dvc repro`, check it is up to date
#   make test    create .venv if missing, install, run the test suite (CI runs this)
#   make params  write params.yaml alone: conf/ composed and resolved, what dvc.yaml's stages read
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install only when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# Stages call `python -m pipeline.<stage>`: make sure that is the venv's python.
export PATH := $(abspath $(BIN)):$(PATH)
# No network at run time: wandb logs offline unless a user opts in.
export WANDB_MODE ?= offline

.PHONY: install test test-all params repro bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

# Everything, including the long end-to-end tests marked `slow`.
test-all: install
	$(BIN)/python -m pytest -m "slow or not slow"

# params.yaml is the composition of conf/ (python -m pipeline.common.config, the same composition DVC
# makes for `dvc exp run -S`): regenerated first, so that one edit of conf/ is all a change needs.
params: install
	$(BIN)/python -m pipeline.common.config

# Then the check that the run reproduced itself: a second look finds nothing to re-run
# (fails if a stage's outputs or the lock changed under it).
repro: params
	$(BIN)/dvc repro
	@$(BIN)/dvc status --quiet || { $(BIN)/dvc status; echo "dvc repro left stages out of date" >&2; exit 1; }
	@echo "dvc status: pipeline up to date, a second dvc repro has nothing to do"

clean-venv:
	rm -rf $(VENV)

# Our attribution methods against plain autograd and Captum, timed (reports/metrics/bench.json);
# `make bench ARGS=bench.resnet152.enabled=true` adds the ResNet-152 entry (13-14 min here).
bench: install
	$(BIN)/python -m pipeline.benchmarks.attribution $(ARGS)
