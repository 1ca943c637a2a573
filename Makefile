# The two commands of the contract: `make train` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DIGITS := data/digits
CITYSCAPES := data/cityscapes-synth
CONFIG ?= configs/digits/baseline.yaml
# One PATH for every step (the fused kernels' JIT builds key on the compiler environment).
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DS_ACCELERATOR ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: venv train test test-fast data bench clean

venv: $(STAMP)

# torch/torchvision are installed first and pinned: pip takes them from the local wheel cache,
# while letting a resolver pick torch would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m pipeline.engine.prebuild
	touch $(STAMP)

# The embedded datasets, written once: digits (classification) and synthetic Cityscapes
# (segmentation: configs/cityscapes/synth_*.yaml). Each takes seconds.
$(DIGITS)/train: | $(STAMP)
	$(BIN)/pipeline data digits --out $(DIGITS)

$(CITYSCAPES)/gtFine: | $(STAMP)
	$(BIN)/pipeline data cityscapes-synth --out $(CITYSCAPES)

data: $(DIGITS)/train $(CITYSCAPES)/gtFine

train: $(STAMP) data
	$(BIN)/pipeline train $(CONFIG) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tier only (tests marked unit: no training run; a few minutes on 2 cores).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

bench: $(STAMP) data
	$(BIN)/python -m benchmarks.loader
	$(BIN)/python -m benchmarks.methods

# The first run on a GPU machine: every method's ImageNet model, timed (ARGS="--cpu": dry run).
.PHONY: gpu-check
gpu-check: $(STAMP)
	benchmarks/gpu_check.sh --no-install $(ARGS)

clean:
	rm -rf $(VENV) data runs checkpoints mlruns mlflow.db
