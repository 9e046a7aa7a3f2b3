# The two commands of the README: `make quickstart` (set up + run the whole pipeline on the embedded
# synthetic default) and `make test` (set up + start a local SLURM cluster + run the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hpc-calo-installed
# CPU wheel pinned: an unpinned torch pulls a multi-GB CUDA build. GPU clusters: see README.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart test lint slurm-up slurm-down bench gpu-wheels gpu-check-dry

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

quickstart: setup
	$(PY) -m launch.submit --cluster local --dataset ds2 --synthetic 3000 --preset quickstart --jobs 2 --showers 2000 --out runs/quickstart
	$(PY) -m bench.quickstart_bars runs/quickstart/report

test: setup
	bash slurm/local_cluster.sh up
	$(VENV)/bin/ruff check .
	HPC_CALO_REQUIRE_SLURM=1 $(PY) -m pytest --timeout=900 -q --durations=15

lint: setup
	$(VENV)/bin/ruff check .

slurm-up:
	bash slurm/local_cluster.sh up

slurm-down:
	bash slurm/local_cluster.sh down

# Wheels the bare GPU machine lacks (nflows, zarr, pytest and dependencies; CPython 3.12, manylinux), into the
# ignored .whl/ that travels with the working tree; bench/gpu/check.sh unpacks them there.
gpu-wheels: setup
	PY=$(PY) bash bench/gpu/wheels.sh

# The GPU check's plan rehearsed on this CPU at toy sizes.
gpu-check-dry: setup
	PYTHON=$(PY) bash bench/gpu/check.sh --dry-run
