"""The demo across build seeds (issue 25): the spread's arithmetic against hand-computed numbers, and
bench/check_demo.py's verdict on a run inside, outside, and with a flagged language."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from icr.stats import spread, t975

from .conftest import load_bench


def _bench(name):
    return load_bench(name)


def test_spread_by_hand():
    # 1..5: mean 3, sd sqrt(10/4) = 1.58114; t_{0.975,4} = 2.776; half-width 2.776 * 1.58114 * sqrt(1.2) = 4.80812
    s = spread([1, 2, 3, 4, 5])
    assert (s["n"], s["mean"], s["min"], s["max"]) == (5, 3.0, 1, 5)
    assert s["sd"] == pytest.approx(1.58114, abs=1e-5)
    assert s["prediction_95"] == pytest.approx([3 - 4.80812, 3 + 4.80812], abs=1e-4)
    assert spread([1, 2, 3, 4, 5], 0.0, 6.0)["prediction_95"] == pytest.approx([0.0, 6.0])  # clipped to the domain
    # two values 0.4, 0.6: sd 0.141421, t_{0.975,1} = 12.706, half 12.706 * 0.141421 * sqrt(1.5) = 2.20076
    assert spread([0.4, 0.6])["prediction_95"] == pytest.approx([0.5 - 2.20076, 0.5 + 2.20076], abs=1e-4)
    assert (t975(11), t975(40)) == (2.228, 1.96)  # between rows: the smaller df's (wider) quantile
    with pytest.raises(ValueError):
        spread([1.0])


def test_chance_allowance_by_hand():
    check_demo = _bench("check_demo")
    # Binomial(26, 0.05): P(X > 3) = 0.0387, P(X > 4) = 0.0085 -> at most 4 of 26 outside
    assert check_demo.allowed_outside(26) == 4
    # m = 1: P(X > 0) = 0.05 >= 0.01, P(X > 1) = 0 -> 1
    assert check_demo.allowed_outside(1) == 1
    assert math.isclose(1 - 0.95 ** 26, 0.73648, abs_tol=1e-5)  # the case for not failing on one figure out


def _run(tmp_path, wr: float, flags: dict | None):
    demo_seeds = _bench("demo_seeds")
    world = tmp_path / "prepared"
    world.mkdir(parents=True, exist_ok=True)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"evaluation": {"judge_args": {"world_dir": str(world)}}}))
    rows = [{"model": m, "iteration": 0, "lang": lang, "judge": "oracle", "n": 60, "wr": wr, "wr_se": 6.0, "lc": None,
             "fidelity": 0.9, "mean_len": 10.0} for m in demo_seeds.MODELS for lang in demo_seeds.LANGS]
    (run / "results.json").write_text(json.dumps(rows))
    (world / "premise.json").write_text(json.dumps({
        "reward_accuracy": {lang: 0.85 for lang in demo_seeds.LANGS},
        "win_rate_pi0_vs_sft": {lang: 0.7 for lang in demo_seeds.LANGS}}))
    if flags is not None:
        (world / "language_flags.json").write_text(json.dumps(flags))
    return run


def _spread_file(tmp_path, recorded_runs):
    demo_seeds = _bench("demo_seeds")
    values = {}
    for run in recorded_runs:
        for name, v in demo_seeds.figures(run, run.parent / "prepared").items():
            values.setdefault(name, []).append(v)
    path = tmp_path / "spread.json"
    path.write_text(json.dumps({"seeds": [0, 1], "headline": demo_seeds.HEADLINE,
                                "figures": {k: spread(v, *demo_seeds.bounds(k)) for k, v in values.items()}}))
    return path


def test_check_demo_holds_inside_and_not_outside_or_flagged(tmp_path):
    check_demo = _bench("check_demo")
    recorded = []
    for i, wr in enumerate((40.0, 50.0)):
        recorded.append(_run(tmp_path / f"seed{i}", wr, {}))
    spread_path = _spread_file(tmp_path, recorded)
    # WR 45: inside every interval
    holds, lines = check_demo.check(_run(tmp_path / "new", 45.0, {}), spread_path)
    assert holds and lines[-1].startswith("demo check: 0 of 26 figures outside (at most 4 by chance)"), lines
    # the interval with 2 seeds is 45 ± 12.706 * 7.071 * 1.2247 = 45 ± 110: clipped to [0, 100]; fidelity and the
    # premise have sd 0, so a different premise is outside: 1 figure, within chance
    premise = json.loads((tmp_path / "new" / "prepared" / "premise.json").read_text())
    premise["reward_accuracy"]["en"] = 0.5
    (tmp_path / "new" / "prepared" / "premise.json").write_text(json.dumps(premise))
    holds, lines = check_demo.check(tmp_path / "new" / "run", spread_path)
    assert holds and "1 of 26 figures outside" in lines[-1]
    assert any(line.startswith("premise.reward_accuracy.en") and line.endswith("OUTSIDE") for line in lines)
    # every fidelity off as well: 8 + 1 figures outside
    results = json.loads((tmp_path / "new" / "run" / "results.json").read_text())
    (tmp_path / "new" / "run" / "results.json").write_text(json.dumps([{**r, "fidelity": 0.1} for r in results]))
    holds, lines = check_demo.check(tmp_path / "new" / "run", spread_path)
    assert not holds and "9 of 26 figures outside" in lines[-1] and "DOES NOT HOLD" in lines[-1]
    # inside, but a language flagged by the build's self-check
    holds, lines = check_demo.check(_run(tmp_path / "flagged", 45.0, {"sw": "pi0 right language 0.12 < floor 0.5"}),
                                    spread_path)
    assert not holds and "self-check: language sw flagged: pi0 right language 0.12 < floor 0.5" in lines
    # a build from before the self-check (no language_flags.json) does not hold either
    holds, lines = check_demo.check(_run(tmp_path / "old", 45.0, None), spread_path)
    assert not holds and any("is missing" in line for line in lines)
