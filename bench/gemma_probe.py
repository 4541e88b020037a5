"""Reduced-size probe of the Gemma sandbox recipe on the REAL model, to size the full run.

    nice -n 10 /usr/bin/time -v python bench/gemma_probe.py --out /tmp/gemma-probe

Runs `prepare_gemma` (bench/sandbox_gemma.py) on the packaged Gemma-3-270M at tiny sizes (load + convert, a few
SFT steps, English pairs, a DPO step or two, the premise with on-policy samples) and prints, per
stage, the wall time and the units it processed, so the full recipe's and config's cost can be
extrapolated (docs/sandbox.md, "Gemma world"). Needs `pip install 'icr[gemma]'`. Wall times
depend on the machine's load: quote them with the load average the probe prints.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

PROBE = dict(n_eval=2, n_dev=2, n_train=2, n_pref=4, n_sft=4, pref_samples=4, dpo_epochs=1, dpo_batch_size=8,
             premise_samples=2, premise_wr_samples=1, premise_policy_samples=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/gemma-probe", help="prepared folder (reused: delete it to re-measure)")
    args = ap.parse_args()
    from icr.runs import read_jsonl
    from sandbox_gemma import DEFAULTS, prepare_gemma  # bench/, beside this script

    t0, load0 = time.time(), os.getloadavg()
    paths = prepare_gemma(args.out, **PROBE)
    out = Path(args.out)
    timings = json.loads((out / "timings.json").read_text())
    premise = json.loads(Path(paths["premise"]).read_text())
    langs = len(premise["win_rate_pi0_vs_sft"])
    units = {
        "sft_conversations": None,  # printed by the SFT trainer log; see recipe sizes below
        "pref_samples": PROBE["n_pref"] * PROBE["pref_samples"],
        "dpo_pairs": len(read_jsonl(out / "pi0_pairs.jsonl")),
        "premise_sampled": PROBE["n_dev"] * langs * (2 * PROBE["premise_wr_samples"] + PROBE["premise_samples"]
                                                      + PROBE["premise_policy_samples"]),
    }
    print(json.dumps({"wall_s": round(time.time() - t0, 1), "loadavg_start": [round(x, 2) for x in load0],
                      "loadavg_end": [round(x, 2) for x in os.getloadavg()], "timings_s": timings, "units": units,
                      "probe_recipe": PROBE, "full_recipe": {k: DEFAULTS[k] for k in PROBE}}, indent=1))


if __name__ == "__main__":
    main()
