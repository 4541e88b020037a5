"""Check that a finished sandbox run's iteration-1 rewards equal the premise's scorer on the same
prompts and answers (the loop's `icr.reward` path vs `icr.sandbox.build.implicit_rewards`).

    python bench/gemma_reward_crosscheck.py runs/sandbox-gemma \
        .cache/icr/prepared/bench_sandbox_gemma.py.prepare_gemma-<key> --langs en,es,sw --rows 45

Written when the Gemma run's premise (0.64 correctness agreement on dev prompts) and its loop's
iteration-1 diagnostics (0.51 on train prompts) disagreed: it rules the scoring in or out. Loads
pi0 and pi_SFT from the prepared folder; every `--stride`-th score row of the chosen languages.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    from icr.sandbox import build
    from sandbox_gemma import recipe_world  # bench/, beside this script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("prepared", type=Path)
    ap.add_argument("--langs", default="en,es,sw")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--rows", type=int, default=45)
    a = ap.parse_args()
    langs = a.langs.split(",")
    rows = [json.loads(line) for f in sorted(glob.glob(str(a.run_dir / "iter1" / "score" / "shard-*.jsonl")))
            for line in open(f, encoding="utf-8")]
    pick = [r for r in rows if r["lang"] in langs][::a.stride][:a.rows]
    tasks = {t.id: t for t in recipe_world(json.loads((a.prepared / "recipe.json").read_text())).split("train")}
    instr = [build.reward_instruction(tasks[r["id"]], r["lang"]) for r in pick]
    sft, tok = build.load_model(a.prepared / "sft")
    dpo, _ = build.load_model(a.prepared / "dpo")
    again = build.implicit_rewards(dpo, sft, tok, instr, [r["response"] for r in pick])
    print(json.dumps({"rows": len(pick), "langs": langs,
                      "max_abs_diff": max(abs(x - r["reward"]) for x, r in zip(again, pick))}))


if __name__ == "__main__":
    main()
