# Two entry points: `make demo` (the main job on the embedded synthetic default) and `make test`;
# `make test-fast` (no slow, browser or learning tests) for the edit-test loop, `make lint` (ruff and mypy).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint clean

# The constraint keeps every dependency from swapping torch for a multi-GB CUDA build. --no-compile:
# Python compiles the modules it imports on first use instead of all of them up front (pip 95 s
# instead of 158 s on 2 cores).
# The package installs in editable mode with its test and app extras (pyproject.toml), so the
# sam3d-* commands are in .venv/bin and a change to the code needs no reinstall.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet --no-compile -e ".[test,app]" -c $(VENV)/constraints.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sam3d-demo --output_dir outputs/demo

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q tests

test-fast: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow and not browser and not learning" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) outputs
