# Two commands matter: `make demo` and `make test`. Both create the environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: on CPU-only machines pip takes the CPU build that
# lies on disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast bench clean

$(BIN)/icr: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev]"
	touch $(BIN)/icr

setup: $(BIN)/icr

demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/icr run configs/sandbox.yaml

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest tests

test-fast: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest tests -m "not slow"

clean:
	rm -rf runs .cache
