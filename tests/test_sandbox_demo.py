"""A reduced sandbox demo through the real CLI: every language, model and control lands in the table."""

from __future__ import annotations

import json

import pytest

from .conftest import REPO
from .test_sandbox_world import TINY as TINY_RECIPE

SANDBOX = REPO / "configs" / "sandbox.yaml"
LANGS = ["en", "es", "de", "fr", "ru", "sw"]


def _overrides(root):
    # train.warmup_ratio=0: the reduced run's smallest control iteration has one optimizer step, which
    # any warm-up would run at learning rate 0 (icr refuses a training that cannot move the weights)
    return ["--set", f"run_root={root}", "--set", f"prepare.args={json.dumps({**TINY_RECIPE, 'seed': 0})}",
            "--set", "generation.n=3", "--set", "generation.max_new_tokens=8", "--set", "evaluation.max_new_tokens=8",
            "--set", "train.epochs=1", "--set", "train.per_device_batch_size=8", "--set", "train.warmup_ratio=0"]


@pytest.mark.slow
def test_reduced_sandbox_demo(tmp_path, cli):
    code, out, err = cli("run", SANDBOX, *_overrides(tmp_path))
    assert code == 0, err
    assert "| M2-random-pairs |" in out and "fidelity" in out  # the table is printed, controls included
    run = tmp_path / "sandbox"
    rows = json.loads((run / "results.json").read_text())
    models = {"sft", "M0", "M1", "M2", "M1-oracle-pairs", "M2-oracle-pairs", "M1-random-pairs", "M2-random-pairs"}
    assert {(r["model"], r["lang"]) for r in rows} == {(m, lang) for m in models for lang in LANGS}
    assert {r["judge"] for r in rows} == {"oracle"}
    report = (run / "report.md").read_text()
    for m in models:
        assert f"| {m} |" in report
    for png in [line.split("](")[1].rstrip(")") for line in report.splitlines() if "](" in line and ".png" in line]:
        assert (run / png).is_file(), png
    agreement = json.loads((run / "diagnostics" / "reward_agreement.json").read_text())
    assert set(agreement) <= set(LANGS) and all("all" in v for v in agreement.values())
    assert (run / "iter2" / "model" / "model.safetensors").is_file()
    assert (run / "controls" / "oracle-pairs" / "iter2" / "pairs" / "pairs.jsonl").is_file()


@pytest.mark.slow
def test_sandbox_ablate_two_seeds(tmp_path, cli):
    code, out, err = cli("sandbox", "ablate", "--config", SANDBOX, "--only", "baseline,multilingual-reward",
                         "--seeds", "1,2", "--iterations", "1", *_overrides(tmp_path))
    assert code == 0, err
    summary = json.loads((tmp_path / "sandbox-ablate" / "ablations.json").read_text())
    assert set(summary) == {"baseline", "multilingual-reward"}
    assert all(set(v["seeds"]) == {"1", "2"} for v in summary.values())
    assert "| multilingual-reward |" in out and "±" in out


def test_unknown_ablation_exits_2(cli):
    code, _, err = cli("sandbox", "ablate", "--config", SANDBOX, "--only", "nope", "--set", "run_root=/tmp/x-unused")
    assert code == 2 and "unknown ablation(s) ['nope']" in err
