#!/usr/bin/env bash
# The device check of issue 19: GPU smoke test and figures for icr (not part of the test suite).
# See bench/gpu_smoke.py for what each part measures.
#
#   bench/gpu_smoke.sh                   # on a machine with an NVIDIA GPU: every part, i.e. gen, score,
#                                        # train, loop, saved_update (and vllm where it imports)
#   bench/gpu_smoke.sh --parts loop,saved_update  # a subset; other flags go to gpu_smoke.py (--gen-shapes ...)
#   bench/gpu_smoke.sh --dry-run-cpu     # tiny shapes on the CPU: checks the script (tests do this)
#   bench/gpu_smoke.sh --fetch-wheels    # on a machine WITH network: put the wheels below in .whl/
#
# Works on a bare GPU machine without network that has torch, transformers, accelerate and peft
# (measured image: Python 3.12, torch 2.11, transformers 5.17, peft 0.21, accelerate 1.15,
# nvidia-ml-py, pyarrow, pandas, xxhash, pyyaml, jinja2; no trl, datasets, vllm, deepspeed or lingua):
# icr runs from the source tree (PYTHONPATH=src, nothing installed), the models are random weights
# built from configs (Llama-3-8B shape for sampling and scoring; a ~100M Llama for training) or the
# tiny pair icr.tiny builds (loop, saved_update). Device memory is read with NVML (nvidia-ml-py) or
# nvidia-smi.
#
# Wheels to carry, exactly (Python 3.12; sizes of the files `--fetch-wheels` downloads, measured
# 2026-12-03 with pip download --no-deps from the package index):
#   .whl/trl-1.16.0-py3-none-any.whl                 948,205 bytes (0.90 MiB)
#   .whl/datasets-5.2.0-py3-none-any.whl             608,276 bytes (0.58 MiB)
#   .whl/dill-0.4.1-py3-none-any.whl                 120,019 bytes (0.11 MiB)
#   .whl/multiprocess-0.70.19-py312-none-any.whl     150,281 bytes (0.14 MiB)
#   total                                          1,826,781 bytes (1.74 MiB), with the checkout (~2.3 MiB
#                                                  tracked) far under the 64 MiB that travels.
# Needed by train (without them it measures a plain-torch DPO+NLL loop instead and says so), loop
# and saved_update (icr's train stage: without them those two parts end FAILED naming trl); gen and
# score need none. Installed with pip --no-index from .whl/ (nothing downloaded).
# Cannot travel: lingua-language-detector (~170 MB) and vllm (~336 MB). lingua is never imported
# here: gen, score and train do not touch it, loop and saved_update run without evaluation (whose
# fidelity needs it) and with the language filter off, so icr's pairs stage records no fidelity
# instead (tests/test_gpu_smoke.py runs every part with a lingua that cannot be imported). vllm is
# measured only where it imports.
#
# Output: `RESULT {json}` lines (tokens/s, seconds, ratios, GPU memory, weights changed) and one
# `SUMMARY <part>: ...` line per part on stdout; copy them into BENCHMARKS.md with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${ICR_WHEELS:-.whl}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # Run where there is network; the GPU machine's Python version and platform in PYV/PLAT (default:
  # the measured image's Python 3.12, whatever Python runs this).
  PYV="${PYV:-312}"
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
for m in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "pynvml", "vllm", "deepspeed"):
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
      || echo "wheel install failed: the train part falls back to the plain-torch loop; loop and saved_update fail"
  else
    echo "trl not importable and no wheels in $WHEELS/: train part uses the plain-torch loop, loop and" \
         "saved_update fail (bring wheels with: bench/gpu_smoke.sh --fetch-wheels on a machine with network)"
  fi
fi

t0=$(date +%s)
"$PY" bench/gpu_smoke.py "$@"
rc=$?
echo "gpu_smoke: exit $rc after $(( $(date +%s) - t0 )) s"
exit $rc
