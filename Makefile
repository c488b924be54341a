# Two entry points for a fresh machine:
#   make demo   - create .venv, install, run the main job on its built-in default
#   make test   - create or reuse .venv, install with test extras, run the tests
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-fast venv bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[test]'
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[lora]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/tinygpt pipeline --config configs/demo.toml --out runs/demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check tinygpt tests benchmarks
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed-test
	$(BIN)/ruff check tinygpt tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/decode_throughput.py
	$(BIN)/python benchmarks/world_throughput.py

clean:
	rm -rf $(VENV) runs
