#!/usr/bin/env bash
# GPU smoke test and figures for icr (not part of the test suite). See bench/gpu_smoke.py.
#
#   bench/gpu_smoke.sh                   # on a machine with an NVIDIA GPU: gen, score, train, vllm
#   bench/gpu_smoke.sh --parts gen,score # a subset; other flags go to gpu_smoke.py (--gen-shapes ...)
#   bench/gpu_smoke.sh --dry-run-cpu     # tiny shapes on the CPU: checks the script (tests do this)
#   bench/gpu_smoke.sh --fetch-wheels    # on a machine WITH network: put the train part's wheels in .whl/
#
# Works on a bare GPU machine without network that has torch, transformers, accelerate and peft
# (measured image: Python 3.12, torch 2.11, transformers 5.17, peft 0.21, accelerate 1.15; no trl,
# datasets, vllm, deepspeed or lingua): icr runs from the source tree (PYTHONPATH=src, nothing
# installed), the models are random weights built from configs (Llama-3-8B shape for sampling and
# scoring; a ~100M Llama for training). Nothing imports lingua.
#
# Wheels, exactly:
#   gen, score:  none.
#   train:       .whl/trl-1.16.0-py3-none-any.whl, .whl/datasets-5.2.0-py3-none-any.whl,
#                .whl/dill-0.4.1-py3-none-any.whl, .whl/multiprocess-0.70.19-py312-none-any.whl
#                (~2 MB; the image already has pyarrow, pandas, xxhash). Installed with
#                pip --no-index from .whl/ (nothing downloaded); without them the train part
#                measures a plain-torch DPO+NLL loop instead and says so.
#   vllm:        measured only where vllm imports (its wheel is too large to carry).
# Output: `RESULT {json}` lines (tokens/s, seconds, ratios, peak GPU memory) on stdout; copy them
# into BENCHMARKS.md with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${ICR_WHEELS:-.whl}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # Run where there is network, with the GPU machine's Python version and platform in PYV/PLAT.
  PYV="${PYV:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')}"
  PLAT="${PLAT:-manylinux_2_28_x86_64}"
  mkdir -p "$WHEELS"
  # trl and datasets, and what datasets needs beyond the image; --no-deps keeps torch and its CUDA
  # libraries out.
  for spec in trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --platform "$PLAT" \
      --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "$spec" || exit 1
  done
  ls -la "$WHEELS"
  echo "copy $WHEELS/ beside the repository on the GPU machine (the device tool: carry [\".whl\"])"
  exit 0
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" - <<'PYEOF'
import importlib
for m in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "vllm", "deepspeed"):
    try:
        print(f"{m:13s}", importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(f"{m:13s} -- ({type(e).__name__})")
PYEOF

if ! "$PY" -c "import trl, datasets" 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing trl/datasets from $WHEELS (no network)"
    # Resolve against what is installed plus the folder; if versions clash, install the wheels alone.
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" trl datasets \
      || "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl \
      || echo "wheel install failed: the train part falls back to the plain-torch loop"
  else
    echo "trl not importable and no wheels in $WHEELS/: train part uses the plain-torch loop" \
         "(bring wheels with: bench/gpu_smoke.sh --fetch-wheels on a machine with network)"
  fi
fi

t0=$(date +%s)
"$PY" bench/gpu_smoke.py "$@"
rc=$?
echo "gpu_smoke: exit $rc after $(( $(date +%s) - t0 )) s"
exit $rc
