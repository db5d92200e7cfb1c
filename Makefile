# Two commands set up and use a fresh machine: `make run` and `make test`.
# The venv is created and filled from requirements.lock only when the lock (or the
# project metadata) is newer than the last install, so repeated calls are fast and silent.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Telemetry off for every tool this project runs (never edit the machine for this).
export KEDRO_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0
export DO_NOT_TRACK := 1
export MPLBACKEND := Agg
# DVC stages call `kedro`; the venv's tools come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

ARGS ?=
PYTEST_ARGS ?=
# Two workers on two cores, each test with one torch thread (tests/conftest.py); a file's tests share a worker.
PYTEST_WORKERS ?= 2

.PHONY: help install run test test-fast bench repro clean-outputs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/:\t/'

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing the locked dependencies into $(VENV) (first time: about 3 minutes)..."
	@$(BIN)/python -m pip install --no-deps -r requirements.lock > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "pip failed: full log in $(VENV)/install.log"; exit 1; }
	@$(BIN)/python -m pip install --no-deps --no-build-isolation -e . >> $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "pip failed: full log in $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the exact locked versions (no-op when up to date)

run: $(STAMP)  ## run the default pipeline on the bundled data (extra kedro flags: ARGS="--params=...")
	$(BIN)/kedro run $(ARGS)

test: $(STAMP)  ## run the whole test suite (extra pytest flags: PYTEST_ARGS="-m 'not slow'")
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the quick loop: everything but the slow end-to-end tests
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

BENCH_ARGS ?= --threads 1
bench: $(STAMP)  ## client-training throughput vs the naive loop, side by side (needs `make run` first): data/08_reporting/benchmark.{json,md}
	$(BIN)/python -m fedmic_pipeline.benchmarks.throughput $(BENCH_ARGS)

repro: $(STAMP)  ## rebuild the DVC stages whose inputs changed
	$(BIN)/dvc repro
