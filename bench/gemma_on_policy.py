"""Re-measure the Gemma sandbox's on-policy premise with more samples per prompt (issue 11, item 3).

    python bench/gemma_on_policy.py .cache/icr/prepared/bench_sandbox_gemma.py.prepare_gemma-<key> --samples 8 \
        --out docs/results/sandbox-gemma-recipe2/premise-on-policy-8.json

`premise.json`'s on-policy part draws 4 samples of pi0 per dev prompt (40 per language), which leaves
~25 English pairs that differ in correctness: too few to tell 0.52 from 0.65. This reruns exactly
`sandbox_gemma.measure_on_policy_premise` (bench/sandbox_gemma.py) on the built pair with `--samples` per prompt; nothing
else changes (same world, oracle, models, temperature, seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    from icr.runs import write_json
    from icr.sandbox import build
    from sandbox_gemma import measure_on_policy_premise, recipe_world  # bench/, beside this script
    from icr.sandbox.oracle import OracleJudge

    p = argparse.ArgumentParser()
    p.add_argument("prepared", type=Path)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    cfg = json.loads((a.prepared / "recipe.json").read_text())
    world = recipe_world(cfg)
    sft, tok = build.load_model(a.prepared / "sft")
    dpo, _ = build.load_model(a.prepared / "dpo")
    t = time.time()
    res = measure_on_policy_premise(world, OracleJudge(a.prepared), dpo, sft, tok,
                                    {**cfg, "premise_policy_samples": a.samples})
    res["seconds"] = round(time.time() - t, 1)
    res["prepared"] = a.prepared.name
    write_json(a.out, res)
    print(json.dumps({k: res[k] for k in ("reward_accuracy", "n_pairs", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
