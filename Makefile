# Two commands on a fresh machine: `make run` and `make test`. Both are idempotent.
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Downloads shared by every checkout on this machine, outside the repository.
export DEEPCAST_CACHE ?= $(HOME)/.cache/deepcast
export PATH := $(BIN):$(PATH)

.PHONY: install tools run test lint schema clean

install: $(STAMP) tools

# torch first and alone: the pin takes the CPU build already on disk, where one exists.
$(STAMP): requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/deepcast embedded install
	touch $(STAMP)

# llama.cpp's tools, built once per version and backend into $(DEEPCAST_CACHE) (about 15 minutes
# on 2 cores the first time; seconds afterwards), and TensorRT Edge-LLM's exporter in its own
# environment there (its pins differ from ours; about 3 minutes the first time).
tools: $(STAMP)
	$(BIN)/deepcast tools install llama.cpp
	$(BIN)/deepcast tools install edgellm

run: install
	$(BIN)/snakemake --cores all
	$(BIN)/snakemake --cores 1 --report report.html
	$(BIN)/deepcast report

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint
	$(BIN)/deepcast config schema --check

schema: install
	$(BIN)/deepcast config schema

clean:
	rm -rf results logs benchmarks .snakemake
