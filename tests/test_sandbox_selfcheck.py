"""No language fails silently: the sandbox build's floors and repair, `language_flags.json` through
`icr run` (a warning, a copy in the run folder) and the report's marks (issue 25)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from icr.config import load_config
from icr.loop import prepared_dir
from icr.report import headline, write_report
from icr.sandbox.build import DEFAULTS, floor_deficit, self_check, sft_shortfalls

from .conftest import REPO


def _q(well_formed, language):
    return {"score": 0.5, "well_formed": well_formed, "correct": 0.5, "language": language, "concise": 0.5}


def test_floors_flag_exactly_the_languages_below_them():
    cfg = {**DEFAULTS, "sft_floor_well_formed": 0.5, "sft_floor_language": 0.8, "pi0_floor_language": 0.5}
    # de: 0.64 well-formed, all of them in German (0.64 / 0.64 = 1.0): passes. sw (this machine's seed-0
    # build before the repair): 0.49 well-formed, 0.325 right language = 0.66 of the well-formed ones.
    sft = {"de": _q(0.64, 0.64), "sw": _q(0.49, 0.325), "es": _q(0.9, 0.63), "ru": _q(0.0, 0.0)}
    assert sft_shortfalls(sft, cfg) == {
        "sw": "well-formed 0.49 < floor 0.5, right language 0.66 of well-formed answers < floor 0.8",
        "es": "right language 0.70 of well-formed answers < floor 0.8",
        "ru": "well-formed 0.00 < floor 0.5, right language 0.00 of well-formed answers < floor 0.8"}
    quality = {"en": {"sft": _q(0.64, 0.64), "pi0": _q(1.0, 1.0)},
               "de": {"sft": _q(0.64, 0.64), "pi0": _q(1.0, 0.07)},  # the other machine's German pi0
               "sw": {"sft": _q(0.49, 0.325), "pi0": _q(0.97, 0.125)}}
    assert self_check(quality, cfg) == {
        "de": "pi0 right language 0.07 < floor 0.5 (dev prompts, T 0.6)",
        "sw": "pi_SFT well-formed 0.49 < floor 0.5, right language 0.66 of well-formed answers < floor 0.8; "
              "pi0 right language 0.12 < floor 0.5 (dev prompts, T 0.6)"}
    assert self_check({"en": quality["en"]}, cfg) == {}
    # pi_SFT judged on the repair's last measurement when given (sw passes there), pi0 on the premise's samples
    assert self_check(quality, cfg, {"en": _q(0.64, 0.64), "de": _q(0.64, 0.64), "sw": _q(0.91, 0.73)}) == {
        "de": "pi0 right language 0.07 < floor 0.5 (dev prompts, T 0.6)",
        "sw": "pi0 right language 0.12 < floor 0.5 (dev prompts, T 0.6)"}
    # the repair's progress measure: sw 0.01 below the well-formed floor + (0.8 - 0.325/0.49 = 0.13673) below
    # the language floor; es (0.9, 0.63): 0.8 - 0.7 = 0.1; de 0
    assert floor_deficit(sft, cfg) == pytest.approx(0.01 + 0.136735 + 0.1 + 0.5 + 0.8, abs=1e-5)
    assert floor_deficit({"de": sft["de"]}, cfg) == 0.0


def _row(model, lang, wr):
    return {"model": model, "iteration": 0 if model == "M0" else 1, "lang": lang, "judge": "oracle", "n": 60,
            "wr": wr, "wr_se": 6.0, "lc": None, "fidelity": 0.9, "mean_len": 10.0}


def test_report_marks_a_flagged_language(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps([_row(m, lang, 50.0) for m in ("M0", "M1") for lang in ("en", "sw")]))
    write_report(run)
    assert "⚠" not in (run / "report.md").read_text()
    (run / "language_flags.json").write_text(json.dumps({"sw": "pi0 right language 0.12 < floor 0.5"}))
    write_report(run)
    report = (run / "report.md").read_text()
    assert "| Model | en WR | sw ⚠ WR | Avg WR |" in report  # no references, no LC: no LC columns
    assert "⚠ sw: flagged by the run's prepare step (language_flags.json): pi0 right language 0.12 < floor 0.5." \
        in report
    assert "⚠ sw: flagged" in headline(run)  # what `icr run` prints at the end


BUILDER = '''
import json
from pathlib import Path

from icr.tiny import prepare as tiny_prepare


def build(out_dir, flags=None, **args):
    paths = tiny_prepare(out_dir, **args)
    if flags is not None:
        (Path(out_dir) / "language_flags.json").write_text(json.dumps(flags))
    return paths
'''


def _flagging_config(tmp_path, flags):
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["prepare"] = {"call": "builder.py:build", "args": {**cfg["prepare"]["args"], "flags": flags}}
    cfg.update(iterations=1, run_root=str(tmp_path / "runs"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_icr_run_warns_and_keeps_the_flags(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "builder.py").write_text(BUILDER)
    code, _, err = cli("run", _flagging_config(tmp_path, {"de": "pi_SFT well-formed 0.10 < floor 0.5"}))
    assert code == 0, err
    assert "prepare flagged language de: pi_SFT well-formed 0.10 < floor 0.5 (the report marks it)" in err
    run = tmp_path / "runs" / "tiny"
    assert json.loads((run / "language_flags.json").read_text()) == {"de": "pi_SFT well-formed 0.10 < floor 0.5"}
    # the same run after its prepare folder stopped flagging: no stale copy is left
    config = _flagging_config(tmp_path, {"de": "pi_SFT well-formed 0.10 < floor 0.5"})
    (prepared_dir(load_config(config)) / "language_flags.json").write_text("{}")
    code, _, err = cli("run", config)
    assert code == 0, err
    assert "prepare flagged" not in err and not (run / "language_flags.json").exists()


def test_malformed_flags_are_one_line(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "builder.py").write_text(BUILDER)
    code, _, err = cli("run", _flagging_config(tmp_path, ["de"]))
    assert code == 2 and "language_flags.json: expected an object of language -> one line" in err
    errors = [line for line in err.splitlines() if line.startswith("icr: error: ")]
    assert len(errors) == 1 and "Traceback" not in err and not (tmp_path / "runs" / "tiny").exists()


# A small build where the high-resource languages learn the answer format (~1 min on one core): TINY's
# 3 dev prompts cannot tell a language that was not trained from one that was.
SMALL = dict(n_eval=4, n_dev=20, n_train=4, n_pref=40, n_sft=150, vocab_size=400, hidden_size=64, num_layers=2,
             pretrain_steps=600, sft_epochs=4, knowledge_repeats=1, knowledge_algorithmic=50, pref_samples=4,
             pref_pairs_per_prompt=2, dpo_epochs=1, dpo_batch_size=8, premise_samples=2, premise_wr_samples=2,
             max_new_tokens=12)


@pytest.mark.slow
def test_an_under_trained_language_is_flagged_by_the_build(tmp_path, cli):
    """A sandbox build whose Swahili has no SFT or monolingual data at all (low_resource_ratio 0): the
    build's check finds it below the floors, the repair has nothing of its own to train on, and the
    language is flagged in `language_flags.json`, premise.json and by `icr sandbox build`; English,
    the best-trained language, is not."""
    pytest.importorskip("trl")
    recipe = {**SMALL, "low_resource_ratio": 0.0, "sft_repair_rounds": 1}
    code, out, err = cli("sandbox", "build", "--config", REPO / "configs" / "sandbox.yaml",
                         "--set", f"prepare.args={json.dumps(recipe)}")
    assert code == 0, err
    folder = Path(next(line for line in out.splitlines() if line.startswith("starting pair in "))
                  .removeprefix("starting pair in "))
    check = json.loads((folder / "sft_check.json").read_text())
    assert "sw" in check["rounds"][0]["below_floor"] and "sw" in check["still_below_floor"]
    # pi0 built, found below in sw, pi_SFT repaired and pi0 built again, twice; then flagged
    assert [("sw" in r["below_floor"], r["sft_repaired"]) for r in check["pi0_rounds"]] == [
        (True, True), (True, True), (True, False)]
    assert "right language 0.00" in check["rounds"][0]["below_floor"]["sw"]
    flags = json.loads((folder / "language_flags.json").read_text())
    assert flags["sw"].startswith("pi_SFT ") and "en" not in flags
    assert f"icr: WARNING: language sw failed the build's self-check: {flags['sw']}" in err


@pytest.mark.slow
def test_same_recipe_builds_identical_files(tmp_path):
    """What is exact (README, docs/sandbox.md): the same recipe on the same machine and versions gives the
    same bytes — weights, the check-and-repair record, the premise, the flags — repair rounds included
    (the reduced recipe leaves every language below the floors, so the repair runs)."""
    pytest.importorskip("trl")
    from icr.sandbox import prepare

    from .test_sandbox_world import TINY

    builds = [tmp_path / "a", tmp_path / "b"]
    for out in builds:
        prepare(out, **TINY)
    check = json.loads((builds[0] / "sft_check.json").read_text())
    assert check["rounds"][0]["below_floor"] and check["pi0_rounds"][0]["sft_repaired"]  # both repairs ran
    for name in ("sft/model.safetensors", "dpo/model.safetensors", "sft_check.json", "language_flags.json",
                 "pi0_pairs.jsonl", "world.json"):
        assert (builds[0] / name).read_bytes() == (builds[1] / name).read_bytes(), name
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "build_timings_s"}  # noqa: E731
    assert strip(builds[0] / "premise.json") == strip(builds[1] / "premise.json")


def test_unknown_dpo_pair_kind_is_one_line_and_writes_nothing(tmp_path):
    from icr.errors import ConfigError
    from icr.sandbox import prepare

    with pytest.raises(ConfigError, match=r"^prepare\.args\.dpo_pair_kinds: expected a non-empty list of "
                                          r"\['well-formedness', 'correctness', 'language', 'conciseness'\], got \['lang'\]$"):
        prepare(tmp_path / "p", dpo_pair_kinds=["lang"])
    assert not (tmp_path / "p").exists()
