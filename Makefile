# Two entry points for a fresh machine:
#   make demo   - create .venv, install, run the main job on its built-in default
#   make test   - create or reuse .venv, install with test extras, run the tests
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-fast venv bench browser clean

# llama.cpp for tests/test_export_gguf.py: llama-cpp-python compiles it from source (about 6 minutes on
# 2 cores), so it is built once into a wheel cache outside the clone, keyed by the CPU's instruction set
# (the build uses -march=native). A failed build is logged and the llama.cpp tests skip, saying why;
# `rm $(VENV)/.installed-llama-cpp` retries it.
LLAMA_CPP_PYTHON := 0.3.36
CPU_KEY := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-8)
WHEEL_CACHE ?= $(HOME)/.cache/tinygpt/wheels/$(CPU_KEY)
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAMA_OPENSSL=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[test]'
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[lora,serve]'
	touch $@

$(VENV)/.installed-llama-cpp: $(VENV)/.installed-test
	@mkdir -p $(WHEEL_CACHE)
	@if ! ls $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_CPP_PYTHON) from source once (~6 min on 2 cores) into $(WHEEL_CACHE)"; \
	  start=$$(date +%s); \
	  if CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip wheel --quiet \
	       --disable-pip-version-check --no-deps --no-binary llama-cpp-python -w $(WHEEL_CACHE) \
	       llama-cpp-python==$(LLAMA_CPP_PYTHON) > $(VENV)/llama-cpp-build.log 2>&1; then \
	    echo "built llama-cpp-python in $$(( $$(date +%s) - start )) s"; \
	  else echo "llama-cpp-python did not build (log: $(VENV)/llama-cpp-build.log): the llama.cpp tests will skip"; fi; \
	fi
	@if ls $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1; then \
	  $(PIP_INSTALL) --find-links $(WHEEL_CACHE) --only-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_PYTHON) \
	    || echo "llama-cpp-python did not install: the llama.cpp tests will skip"; fi
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/tinygpt pipeline --config configs/demo.toml --out runs/demo

test: $(VENV)/.installed-test $(VENV)/.installed-llama-cpp
	$(BIN)/ruff check tinygpt tests benchmarks
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed-test $(VENV)/.installed-llama-cpp
	$(BIN)/ruff check tinygpt tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/decode_throughput.py
	$(BIN)/python benchmarks/world_throughput.py
	$(BIN)/python benchmarks/serve_load.py

# Debian's chromium + chromium-driver for tests/test_serve_page.py (needs root and apt; without them
# that test skips and says why). Nothing here downloads a browser of its own.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver >/dev/null || echo "could not install chromium: the browser test will skip"; \
	else \
		echo "chromium/chromedriver missing (apt-get install chromium chromium-driver as root): the browser test will skip"; \
	fi

clean:
	rm -rf $(VENV) runs
