# The README's two commands. Each builds its own virtual environment from scratch.
# TORCH pins the CPU build that CI machines carry; override it for a CUDA build (e.g. TORCH=torch).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Pre-train the default model (mini, WordPiece) on the embedded Shakespeare corpus: about 6 minutes on 2 CPU cores.
# Installs only what pre-training and its end-of-run plot need.
demo: $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[plot]"
	$(BIN)/maskedlm pretrain

# The test suite, with the test toolchain (transformers, datasets, pyarrow, selenium, ...).
test: $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[test]"
	$(BIN)/python -m pytest -q
