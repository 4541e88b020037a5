"""What the evaluated answers of a finished sandbox run are made of: per model and language, the
share of answers the oracle finds well-formed, correct, in the prompt's language and concise, and
their mean oracle score.

    python bench/sandbox_qualities.py runs/sandbox-gemma --out docs/results/sandbox-gemma/eval_qualities.json

The report's win rates say whether a model beats the reference; this says which quality moved
(e.g. whether ICR's gain is correctness or language fidelity). It reads only the run's
`eval/<model>/<lang>/model_outputs.json` (and its controls') and the world the run's judge was given
(`evaluation.judge_args.world_dir` in the run's config.yaml); no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

def qualities(run_dir: Path) -> dict:
    import yaml

    from icr.sandbox.build import quality_shares
    from icr.sandbox.oracle import OracleJudge

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    world = cfg.get("evaluation", {}).get("judge_args", {}).get("world_dir")
    if not world:
        raise SystemExit(f"{run_dir / 'config.yaml'}: evaluation.judge_args.world_dir is not set: not a sandbox run")
    oracle = OracleJudge(world)
    out: dict = {}
    eval_dirs = [run_dir / "eval", *sorted((run_dir / "controls").glob("*/eval"))]
    for model_dir in [p for d in eval_dirs for p in sorted(d.iterdir()) if p.is_dir()]:
        for lang_dir in sorted(p for p in model_dir.iterdir() if (p / "model_outputs.json").is_file()):
            rows = json.loads((lang_dir / "model_outputs.json").read_text())
            verdicts = [oracle.verdict(r["output"], r["id"], lang_dir.name) for r in rows]
            out.setdefault(model_dir.name, {})[lang_dir.name] = {**quality_shares(verdicts), "n": len(verdicts)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="write the numbers here (JSON)")
    a = ap.parse_args()
    res = qualities(a.run_dir)
    if a.out:
        a.out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    langs = sorted({lang for m in res.values() for lang in m})
    print("| model | " + " | ".join(langs) + " |")
    print("|---|" + "---|" * len(langs))
    order = ["sft", "M0"] + sorted(m for m in res if m not in ("sft", "M0"))
    for model, per in ((m, res[m]) for m in order if m in res):
        cells = [f"{per[lang]['correct']:.2f} / {per[lang]['language']:.2f} / {per[lang]['concise']:.2f}"
                 if lang in per else "–" for lang in langs]
        print(f"| {model} | " + " | ".join(cells) + " |")
    print("\ncells: correct / in the prompt's language / concise (shares of the evaluated answers)")


if __name__ == "__main__":
    main()
