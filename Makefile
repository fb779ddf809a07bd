# Two commands for a fresh clone: `make demo` (the live demo) and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/cmu-mosi/mosi_utterance_features.npz
STAMP := $(VENV)/.installed

.PHONY: demo mosi test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch pinned in the same command (ENVIRONMENT.md): unpinned, pip pulls several GB of CUDA wheels.
	$(BIN)/pip install -q -e '.[dev]' 'torch==2.13.0'
	touch $(STAMP)

install: $(STAMP)

# The live pipeline on the bundled clip with tiny untrained models (overlay with a display, headless without).
demo: $(STAMP)
	$(BIN)/mcihn-live --demo

# MCIHN (5 seeds) against the ridge baseline on the shared CMU-MOSI features (docs/results.md).
mosi: $(STAMP)
	$(BIN)/mcihn demo --data $(DATA)

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
