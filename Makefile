# Two commands for a fresh machine: `make demo` and `make test`. Both build .venv first if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test env lock clean server serve flow sweep bench bench-orchestration

env: $(STAMP)

# Exact versions come from constraints.txt, so every machine gets the same environment.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "ctcflow needs Python 3.11, \
	and $(PYTHON) is $$($(PYTHON) --version 2>&1): run make PYTHON=python3.11 (after make clean if .venv exists)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# The whole pipeline on the built-in demo corpus (DVC skips what is up to date), then a few
# lines: test WER and CER of both decoders, the time dvc repro took, where the plots are.
# `&&`: a failing dvc repro fails make, and no summary is printed.
demo: $(STAMP)
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "make demo needs a git checkout (DVC runs inside one)"; exit 1; }
	@start=$$(date +%s) && dvc repro && ctcflow summary --elapsed $$(( $$(date +%s) - start ))

test: $(STAMP)
	$(BIN)/python -m pytest

# Prefect (see docs/orchestration.md): `make server` in one terminal, the others
# in another; they find the server on 127.0.0.1:4200 (or PREFECT_API_URL).
server: $(STAMP)
	$(BIN)/python -m pipeline server

# The deployment with flow.cron from params.yaml; runs until stopped.
serve: $(STAMP)
	$(BIN)/python -m pipeline serve

# The pipeline flow once; SET="train.epochs=2 train.seed=1" makes it a DVC experiment. Make splits
# SET at spaces, so write each value without them (train.blank_penalty={mode:none,weight:0.0}), or
# call python -m pipeline run --set directly. Quoted: bash would brace-expand {a,b}.
flow: $(STAMP)
	$(BIN)/python -m pipeline run $(foreach kv,$(SET),--set '$(kv)')

# flow.sweep's grid as DVC experiments, ranked by flow.sweep.rank_by (test WER by default).
sweep: $(STAMP)
	$(BIN)/python -m pipeline sweep

# Every benchmark on this project's demo outputs (run `make demo` first), about 37 min on an idle
# 2-core machine (benchmarks/run_all.py); figures in benchmarks/results/ (docs/performance.md).
# QUICK=1: a 3–4-minute smoke test whose figures are noise, written to benchmarks/results/quick/.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --project-dir . $(if $(filter 1 yes true,$(QUICK)),--quick)

bench-orchestration: $(STAMP)
	$(BIN)/python benchmarks/orchestration.py

# Re-pin constraints.txt after adding a dependency to pyproject.toml: the environment is brought up
# to date first (a new package installs unpinned), then frozen into a new file that replaces the old
# one only once it is whole. To move a pinned version, edit its line in constraints.txt instead.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV)
