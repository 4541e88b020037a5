"""Model outputs in alpaca_eval's format.

alpaca_eval's model-output format is a JSON array of
`{"instruction", "output", "generator", "dataset", "id"}` — what `alpaca_eval evaluate
--model_outputs` reads, and the format of X-AlpacaEval's reference answers. Evaluation prompts and
references are read by `icr.data` (one loader for both); the rows written here keep each prompt's
id as its source wrote it (an integer stays an integer) and its `dataset`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError, IcrError
from ..runs import atomic_write_text

MODEL_OUTPUT_FIELDS = ("instruction", "output", "generator", "dataset", "id")
DEFAULT_DATASET = "x_alpaca_eval"


# ---------------------------------------------------------------------------------------------
# Model outputs
# ---------------------------------------------------------------------------------------------

def to_model_outputs(prompts: list[dict], outputs: list[str], generator: str) -> list[dict]:
    """Rows in alpaca_eval's model-output format, one per prompt, in prompt order.

    `prompts` are `PromptSet.as_rows()` rows: `id` as the source wrote it, `dataset` when known
    (else "x_alpaca_eval"). `generator` names the model, e.g. "<run>/M1"."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    return [{"instruction": p["instruction"], "output": out, "generator": generator,
             "dataset": p.get("dataset", DEFAULT_DATASET), "id": p["id"]}
            for p, out in zip(prompts, outputs)]


def write_model_outputs(path: Path, rows: list[dict]) -> None:
    atomic_write_text(Path(path), json.dumps(rows, ensure_ascii=False, indent=1) + "\n")


def read_model_outputs(path: Path) -> list[dict]:
    """Read and check a model-output file (each row needs at least `instruction` and `output`)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IcrError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of model outputs, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in ("instruction", "output") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}: row {i}: missing or non-string field(s) {', '.join(missing)}")
    return rows
