"""A judge used in the loop itself (pairs chosen by the judge, reward agreement) is closed before each
training stage, so a reward-model judge does not hold its GPU memory through training (issue 19)."""

from __future__ import annotations

import yaml

from .conftest import REPO

JUDGE = '''
from icr.evaluation.judges import FakeJudge

EVENTS = []


class ClosingJudge(FakeJudge):
    def score(self, items):
        EVENTS.append("score")
        return super().score(items)

    def close(self):
        EVENTS.append("close")
'''


def test_the_loop_closes_its_judge_after_each_pairs_stage(tmp_path, monkeypatch, cli):
    (tmp_path / "closing_judge.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.update(run_root=str(tmp_path / "runs"), isolate_stages=False)
    cfg["pairs"]["selection"] = "judge"
    cfg["evaluation"] = {"judge": "closing_judge:ClosingJudge"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = cli("run", path)
    assert code == 0, err
    import closing_judge

    events = closing_judge.EVENTS
    assert events.count("close") == 2 and events[0] == "score", events  # one per iteration, after its pairs
    assert events[-1] == "close"
