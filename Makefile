# make train: trains recipes/digits_cnn.yaml; make test: the whole test suite (as CI runs it);
# make test-fast: the inner loop (unit + in-process tests, one-process kill/resume; no torchrun,
# no SLURM), under 3 minutes on a 2-core machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast lint format bench clean reference

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: a local CPU build on this machine kind, the CUDA build on a GPU box.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/dist-train train recipes/digits_cnn.yaml

# Two pytest-xdist workers (TEST_WORKERS=0 for none) taking whole test files, for both loops;
# the SLURM tests stay together on one worker (tests/conftest.py). --durations lists the slowest.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=25

# DIST_TRAIN_TEST_FAST=1: a test that launches torchrun/ranks or SLURM here fails, naming the
# marker it lacks (tests/procs.py), instead of quietly slowing the loop down.
FAST_MARKERS := not slow and not dist and not slurm
test-fast: $(STAMP)
	DIST_TRAIN_TEST_FAST=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) -m "$(FAST_MARKERS)"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf runs wandb .pytest_cache .ruff_cache

# Regenerate the recipe reference in README from the typed config (a test checks it is current).
reference: $(STAMP)
	$(BIN)/python -m dist_train.config.reference README.md
