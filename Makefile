# dsdiff developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-full bench pretrain pretrain-dit docs clean clean-runs

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install dsdiff with its dev extras (about 2 min, 6 GB: CUDA torch)

demo: $(STAMP)  ## install if needed, then run the main job on the built-in shapes world (CPU, offline)
	$(BIN)/python -m dsdiff.train +experiment=shapes_deeplab

test: $(STAMP)  ## the fast test suite
	$(BIN)/python -m pytest -q

test-full: $(STAMP)  ## every test, slow ones included
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)  ## the benchmarks in experiments/ (write tables to experiments/results/: --write-results)
	$(BIN)/python experiments/bench_generation.py --write-results
	$(BIN)/python experiments/bench_train.py --write-results
	$(BIN)/python experiments/bench_data.py --write-results

pretrain: $(STAMP)  ## retrain the shipped tiny shapes text-to-image model (bag of words, then contextual) into dsdiff/assets/shapes_t2i (CPU, resumable)
	$(BIN)/python -m dsdiff.pretrain +experiment=shapes_t2i
	$(BIN)/python -m dsdiff.pretrain +experiment=shapes_t2i_contextual threads=2 export_dir=dsdiff/assets/shapes_t2i

pretrain-dit: $(STAMP)  ## retrain the shipped tiny shapes diffusion transformer (SD3 layout) into dsdiff/assets/shapes_dit (CPU, resumable)
	$(BIN)/python -m dsdiff.pretrain +experiment=shapes_dit threads=2 export_dir=dsdiff/assets/shapes_dit

docs: $(STAMP)  ## build the documentation site into site/ (mkdocs --strict)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:  ## remove what builds and tests leave (site/, build/, dist/, caches); never runs (see clean-runs)
	rm -rf site build dist .pytest_cache .ruff_cache *.egg-info
	find . -path ./.venv -prune -o -type d -name __pycache__ -exec rm -rf {} +

clean-runs:  ## DELETE every run and its checkpoints under logs/, outputs/, multirun/ (trained models included)
	rm -rf logs outputs multirun
