"""The on-policy premise of a sandbox build (issue 21): does pi0's implicit reward order pi0's OWN
answers by the oracle's qualities, in English and across languages, with intervals clustered by prompt?

    python bench/sandbox_premise.py <prepared folder> --out premise_on_policy.json [--samples 8]

What ICR scores is the current policy's samples (T 0.9), not pi_SFT's (the build's premise.json):
on pi_SFT's T 1.0 samples wrong answers are often implausible numbers, easy to rank; pi0's own wrong
answers are plausible ones. So here pi0 samples `--samples` answers per `dev` prompt in every language
(T 0.9, top-p 1.0, as configs/sandbox.yaml's iteration 1), the reward log pi0 - log pi_SFT scores them
under G(x) (English instruction, behind the language prefix outside English: the build's own
`reward_instruction`), and every pair of distinct answers the oracle tells apart is a test
(`icr.diagnostics.pair_agreement`, the loop's measure). Per language and pair kind: agreement, pairs,
prompts, and a 95% interval from a bootstrap over prompts (`icr.stats.cluster_bootstrap`: a prompt's
pairs share its answers, so pairs are not independent draws). Also the share of each quality among
pi0's and pi_SFT's answers. Research code outside the package: it reads a build's folder and the
build's public helpers; nothing in the pipeline depends on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def agreement_table(hits_by_kind: dict[str, list[tuple[str, float]]], seed: int) -> dict:
    """{kind: {agree, n, prompts, ci_95}} from {kind: [(prompt id, hit), ...]}; the interval resamples
    prompts (None with fewer than 2 prompts)."""
    from icr.stats import cluster_bootstrap

    out = {}
    for kind, rows in sorted(hits_by_kind.items()):
        values, clusters = [h for _, h in rows], [p for p, _ in rows]
        prompts = len(set(clusters))
        ci = cluster_bootstrap(values, clusters, seed=seed)["ci_95"] if prompts >= 2 else None
        out[kind] = {"agree": round(sum(values) / len(values), 4), "n": len(values), "prompts": prompts,
                     "ci_95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)]}
    return out


def on_policy_premise(prepared: Path, samples: int, temperature: float, split: str, seed: int,
                      languages: list[str] | None = None) -> dict:
    import torch

    from icr.diagnostics import pair_agreement
    from icr.sandbox.build import (implicit_rewards, load_model, quality_shares, reward_instruction, sample)
    from icr.sandbox.oracle import OracleJudge
    from icr.sandbox.world import LANGUAGES, World

    torch.set_num_threads(1)  # as the build: one thread trains/samples the tiny model fastest on 2 shared cores
    world = World.from_json(json.loads((prepared / "world.json").read_text()))
    oracle = OracleJudge(prepared)
    sft_model, tok = load_model(prepared / "sft")
    dpo_model, _ = load_model(prepared / "dpo")
    tasks = world.split(split)
    res = {"prepared": str(prepared), "split": split, "n_prompts": len(tasks), "samples": samples,
           "temperature": temperature, "seed": seed, "languages": {}}
    t0 = time.time()
    for lang in languages or LANGUAGES:
        instr = [t.instruction(lang) for t in tasks]
        outs = sample(dpo_model, tok, instr, samples, temperature, 1.0, 24, seed)
        sft_outs = sample(sft_model, tok, instr, samples, temperature, 1.0, 24, seed + 1)
        rows = [(t, y) for t, o in zip(tasks, outs) for y in dict.fromkeys(o)]
        rewards = implicit_rewards(dpo_model, sft_model, tok, [reward_instruction(t, lang) for t, _ in rows],
                                   [y for _, y in rows])
        rows_of: dict[str, list[int]] = {}
        for j, (t, _) in enumerate(rows):
            rows_of.setdefault(t.id, []).append(j)
        hits: dict[str, list[tuple[str, float]]] = {}
        for tid, idx in rows_of.items():  # per prompt, so every hit keeps its prompt (the bootstrap's cluster)
            tallies = pair_agreement([tid] * len(idx), [rows[j][1] for j in idx], [rewards[j] for j in idx],
                                     [oracle.score_text(rows[j][1], tid, lang) for j in idx],
                                     lambda a, b, pid: oracle.pair_kind(a, b, pid, lang))
            for kind, vals in tallies.items():
                hits.setdefault(kind, []).extend((tid, v) for v in vals)
        res["languages"][lang] = {
            "agreement": agreement_table(hits, seed),
            "pi0_quality": quality_shares(oracle.verdict(o, t.id, lang) for t, os_ in zip(tasks, outs) for o in os_),
            "sft_quality": quality_shares(oracle.verdict(o, t.id, lang) for t, os_ in zip(tasks, sft_outs) for o in os_),
            "distinct_answers_per_prompt": round(len(rows) / len(tasks), 2),
        }
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prepared", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--languages", default=None, help="comma-separated (default: all)")
    a = ap.parse_args(argv)
    for name in ("world.json", "sft", "dpo"):
        if not (a.prepared / name).exists():
            print(f"{a.prepared}: no {name}: not a finished sandbox build", file=sys.stderr)
            return 2
    res = on_policy_premise(a.prepared, a.samples, a.temperature, a.split, a.seed,
                            a.languages.split(",") if a.languages else None)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(a.out)
    for lang, r in res["languages"].items():
        c = r["agreement"].get("correctness")
        print(f"{lang}: all {r['agreement']['all']['agree']:.2f} ({r['agreement']['all']['n']}); correctness "
              + (f"{c['agree']:.2f} ({c['n']} pairs, {c['prompts']} prompts, CI {c['ci_95']})" if c else "none")
              + f"; pi0 correct {r['pi0_quality']['correct']:.2f} vs sft {r['sft_quality']['correct']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
