# steplog: the only entry points a newcomer needs.
#   make run     bring up the local stack (PostgreSQL+TimescaleDB, SeaweedFS S3) and the service, run the example
#   make test    install what is missing, lint, and run the whole suite against the real stack
#   make bench   benchmarks (bench/README.md); make bench-faults: the fuzz and chaos runs;
#                make bench-peers: W1 against MLflow in the same run
#   make protos  regenerate sdk/steplog/v1 from protos/
#   make lint    ruff, mypy (strict), the layer contracts (lint-imports), buf lint
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STATE   ?= .steplog
TOOLS   := $(STATE)/tools
BUF_VERSION := 1.61.0
BUF     := $(TOOLS)/node_modules/.bin/buf
STAMP   := $(VENV)/.steplog-installed
PROCESSES ?= 1

.PHONY: help setup system venv buf run test lint protos protos-check bench bench-faults bench-peers stop clean

help:
	@echo "make run | make test | make bench | make protos | make lint | make stop | make clean"

## setup: everything the project needs, installed only when missing (idempotent, fast the second time)
setup: system venv buf

system:
	@bash deploy/local/setup-system.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

buf: $(BUF)

$(BUF):
	@mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

## run: the embedded stack + the service in the foreground; Ctrl-C stops everything
run: setup
	$(PY) -m ingest dev --root $(STATE) --processes $(PROCESSES) --example

## stop: the local stacks left running (make run's, the tests', the benchmarks')
stop:
	-@for root in $(STATE)/test-stack $(STATE)/bench $(STATE)/chaos $(STATE); do \
		[ -f $$root/stack.json ] && $(PY) -m ingest.devstack stop --root $$root; \
	done; true

## protos: regenerate the Python protocol code
protos: venv
	$(PY) protos/generate.py sdk

lint: setup
	$(VENV)/bin/ruff check ingest sdk tests bench
	$(VENV)/bin/ruff format --check ingest sdk tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(BUF) lint protos

test: setup lint
	$(PY) -m pytest

bench: setup
	$(PY) -m bench.run_all

## bench-peers: W1 through steplog, then through MLflow's server on the same PostgreSQL (W1_PEER line);
##   MLflow goes into a virtualenv of its own, installed only when missing
PEERS_VENV    := $(STATE)/peers-venv
MLFLOW_VERSION := 3.17.2

bench-peers: setup $(PEERS_VENV)/.installed
	$(PY) -m bench.peers

$(PEERS_VENV)/.installed:
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q 'mlflow==$(MLFLOW_VERSION)' psycopg2-binary
	@touch $@

## bench-faults: 100,000 hostile messages (FUZZ line), then kill -9 / SIGTERM / PostgreSQL / S3 faults (CHAOS lines)
bench-faults: setup
	$(PY) -m bench.fuzz; fuzz=$$?; $(PY) -m bench.chaos; chaos=$$?; exit $$(( fuzz || chaos ))

## clean: stop the stacks, delete their data (also a cluster kept outside the clone), the venv
##   (nested stacks first; remove deletes only its own entries anyway)
clean:
	-@for root in $(STATE)/test-stack $(STATE)/bench $(STATE)/chaos $(STATE); do \
		[ -f $$root/stack.json ] && $(PY) -m ingest.devstack remove --root $$root; \
	done; true
	rm -rf $(STATE) $(VENV)
