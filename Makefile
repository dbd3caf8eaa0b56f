# GNU make under sh (Linux, macOS) and cmd.exe (Windows). Every recipe line is a single python command:
# no VAR=x prefixes, export, rm -rf, mkdir -p, single quotes or Unix tools.
# On a fresh machine `make demo` and `make test` do all set-up (a .venv with requirements.txt).
# Each domain's targets live in mk/<domain>.mk, included below.

ifeq ($(OS),Windows_NT)
VENV_PYTHON := .venv\Scripts\python.exe
BOOTSTRAP_PYTHON ?= python
else
VENV_PYTHON := .venv/bin/python
BOOTSTRAP_PYTHON ?= python3
endif
PYTHON := $(VENV_PYTHON)
STAMP := .venv/installed.stamp
CONFIG ?=
ARGS ?=
DEMO_TARGETS := common-demo

.PHONY: setup test test-all test-gpu demo lint clean common-demo help

help:
	$(BOOTSTRAP_PYTHON) tools/mk.py help

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(BOOTSTRAP_PYTHON) -m venv .venv
	$(VENV_PYTHON) -m pip install -r requirements.txt
	$(VENV_PYTHON) -m pip install --no-deps -e .
	$(VENV_PYTHON) tools/mk.py touch $(STAMP)

test: setup
	$(PYTHON) -m pytest

test-all: setup
	$(PYTHON) -m pytest -m "slow or not slow"

test-gpu: setup
	$(PYTHON) -m pytest -m cuda -rs

lint: setup
	$(PYTHON) -m ruff check .

clean:
	$(BOOTSTRAP_PYTHON) tools/mk.py clean

common-demo: setup
	$(PYTHON) -m common.demo --config configs/common/demo.yaml --output-dir runs/demo/common

-include $(wildcard mk/*.mk)

demo: setup $(DEMO_TARGETS)
	$(PYTHON) -m common.report --demo-dir runs/demo --output runs/demo/REPORT.md
