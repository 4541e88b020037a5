"""Does a demo run hold what README states? Its figures against the recorded multi-seed spread.

    python bench/check_demo.py runs/sandbox                     # after `make demo`
    python bench/check_demo.py runs/sandbox --strict            # CI: exit 1 when it does not hold

Reads the run's results.json and its prepare folder's premise.json and language_flags.json, and
docs/results/sandbox-demo-seeds/spread.json (`bench/demo_seeds.py`). For every figure README's
table states (`HEADLINE`), prints the run's value beside the 95% prediction interval for one more
build. The run holds when no language is flagged by the build's self-check and no more figures fall
outside their interval than chance allows: with m figures each outside with probability 0.05, the
count outside is at most the smallest k with P(Binomial(m, 0.05) > k) < 0.01 (the figures are
correlated, which makes this rule approximate; it is stated, not tuned). Exact bytes are not
compared: other CPUs give other numbers (docs/sandbox.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_seeds import REPO, figures, prepared_of  # noqa: E402

SPREAD = REPO / "docs" / "results" / "sandbox-demo-seeds" / "spread.json"


def allowed_outside(m: int, p: float = 0.05, alpha: float = 0.01) -> int:
    """The smallest k with P(Binomial(m, p) > k) < alpha."""
    tail = 1.0
    for k in range(m + 1):
        tail -= math.comb(m, k) * p ** k * (1 - p) ** (m - k)
        if tail < alpha:
            return k
    return m


def check(run_dir: Path, spread_path: Path = SPREAD) -> tuple[bool, list[str]]:
    """(holds, lines to print) for one run against the recorded spread."""
    recorded = json.loads(spread_path.read_text())
    prepared = prepared_of(run_dir)
    got = figures(run_dir, prepared)
    flags_path = prepared / "language_flags.json"
    flags = json.loads(flags_path.read_text()) if flags_path.is_file() else None
    lines = [f"{'figure':34} {'this run':>9}  95% interval ({len(recorded['seeds'])} build seeds)"]
    outside = []
    for name in recorded["headline"]:
        lo, hi = recorded["figures"][name]["prediction_95"]
        value = got[name]
        ok = lo - 1e-9 <= value <= hi + 1e-9
        if not ok:
            outside.append(name)
        lines.append(f"{name:34} {value:9.3f}  [{lo:.3f}, {hi:.3f}]{'' if ok else '  OUTSIDE'}")
    k = allowed_outside(len(recorded["headline"]))
    if flags is None:
        lines.append(f"self-check: {flags_path} is missing (a build from before the self-check): rebuild it")
    for lang, why in (flags or {}).items():
        lines.append(f"self-check: language {lang} flagged: {why}")
    holds = flags == {} and len(outside) <= k
    lines.append(f"demo check: {len(outside)} of {len(recorded['headline'])} figures outside (at most {k} by chance), "
                 f"{len(flags or {})} language(s) flagged: {'holds' if holds else 'DOES NOT HOLD'}"
                 + ("" if holds else " — please report it with this output and your CPU "
                    "(docs/sandbox.md, 'The demo across machines')"))
    return holds, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--spread", default=str(SPREAD))
    ap.add_argument("--strict", action="store_true", help="exit 1 when the run does not hold")
    args = ap.parse_args(argv)
    holds, lines = check(Path(args.run_dir), Path(args.spread))
    print("\n".join(lines))
    return 0 if holds or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
