# make demo: set up .venv and run the whole pipeline on a tiny random model (CPU, minutes).
# make test: set up .venv and run the full test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench bench-7b

setup: $(STAMP)

$(STAMP): requirements.txt
	@command -v mpirun >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing openmpi (mpirun, for mpi4py)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null; \
	  else \
	    echo "mpirun not found: run 'sudo apt-get install openmpi-bin libopenmpi-dev', then make again" >&2; exit 1; \
	  fi; }
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (headless browser for the serve.py page test)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium not found: tests/test_serve.py skips its page test; 'sudo apt-get install chromium' runs it" >&2; \
	  fi; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	@touch $(STAMP)

demo: setup
	$(BIN)/python demo.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/merge_memory.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/serve_throughput.py
	$(BIN)/python bench/qlora_memory.py

# 7B geometry on CPU: ~15 minutes and 60 GB of free disk; not part of `make bench`
bench-7b: setup
	$(BIN)/python bench/pipeline_7b.py --cold
