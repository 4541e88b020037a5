"""The whole loop through the real CLI: `icr run configs/tiny.yaml`, resume, determinism, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"


def _files(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob(pattern)) if p.is_file()}


DATA_FILES = ["iter*/generate/shard-*.jsonl", "iter*/score/shard-*.jsonl", "iter*/pairs/pairs.jsonl",
              "iter*/pairs/stats.json"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from icr.cli import main

    root = tmp_path_factory.mktemp("runs")
    assert main(["run", str(TINY), "--set", f"run_root={root}", "-q"]) == 0
    return root / "tiny"


@pytest.mark.slow
def test_tiny_run_finishes_two_iterations(tiny_run):
    for t in (1, 2):
        it = tiny_run / f"iter{t}"
        for stage in ("generate", "score", "pairs", "train"):
            manifest = json.loads((it / stage / "manifest.json").read_text())
            assert manifest["key"]["stage"] == stage and "torch" in manifest["versions"]
        assert (it / "model" / "model.safetensors").is_file() and (it / "model" / "chat_template.jinja").is_file()
        pairs = [json.loads(line) for line in (it / "pairs" / "pairs.jsonl").read_text().splitlines()]
        assert pairs and {p["lang"] for p in pairs} == {"en", "es", "de"}
        assert not (it / "train" / "checkpoints").exists()
    # iteration 2 samples from pi1, not pi0
    gen2 = json.loads((tiny_run / "iter2/generate/manifest.json").read_text())["key"]["policy"]
    gen1 = json.loads((tiny_run / "iter1/generate/manifest.json").read_text())["key"]["policy"]
    assert gen1 != gen2


@pytest.mark.slow
def test_second_invocation_does_no_work(tiny_run, cli):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file()}
    timings = json.loads((tiny_run / "timings.json").read_text())
    code, out, err = cli("run", TINY, "--set", f"run_root={tiny_run.parent}")
    assert code == 0
    assert err.count("skipped (manifest matches)") == 8
    # the skipped stages keep the times they took when they ran
    assert json.loads((tiny_run / "timings.json").read_text()) == timings and timings["iter1/train"] > 0
    after = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file() and p.name != "timings.json"}
    changed = [str(p) for p, m in after.items() if before.get(p) != m]
    assert not changed


@pytest.mark.slow
def test_interrupted_stage_resumes_to_the_same_bytes(tiny_run, cli):
    score = tiny_run / "iter1" / "score"
    victim = score / "shard-00002.jsonl"
    original = victim.read_bytes()
    untouched = {p: p.stat().st_mtime_ns for p in score.glob("shard-*.jsonl") if p != victim}
    # An interrupted scoring stage: one shard missing, no manifest yet.
    victim.unlink()
    (score / "manifest.json").unlink()
    code, _, err = cli("run", TINY, "--set", f"run_root={tiny_run.parent}")
    assert code == 0
    assert victim.read_bytes() == original
    assert all(p.stat().st_mtime_ns == m for p, m in untouched.items())  # finished shards not recomputed
    assert "iter1 pairs    skipped" in err  # same scores, so downstream stages are still valid


@pytest.mark.slow
def test_same_config_and_seed_give_identical_data_files(tiny_run, tmp_path):
    from icr.cli import main

    assert main(["run", str(TINY), "--set", f"run_root={tmp_path}", "-q"]) == 0
    for pattern in DATA_FILES:
        ours, theirs = _files(tiny_run, pattern), _files(tmp_path / "tiny", pattern)
        assert ours and ours == theirs, pattern


@pytest.mark.slow
def test_stage_commands_and_shards(tiny_run, tmp_path, cli):
    """`icr generate --shard i/n` twice equals the unsharded stage."""
    args = ["--set", f"run_root={tmp_path}", "--iteration", "1"]
    assert cli("generate", TINY, *args, "--shard", "0/2")[0] == 0
    assert not (tmp_path / "tiny/iter1/generate/manifest.json").exists()
    assert cli("generate", TINY, *args, "--shard", "1/2")[0] == 0
    assert (tmp_path / "tiny/iter1/generate/manifest.json").exists()
    assert _files(tmp_path / "tiny", "iter1/generate/shard-*") == _files(tiny_run, "iter1/generate/shard-*")
    assert cli("score", TINY, *args)[0] == 0
    assert cli("pairs", TINY, *args)[0] == 0
    assert _files(tmp_path / "tiny", "iter1/pairs/pairs.jsonl") == _files(tiny_run, "iter1/pairs/pairs.jsonl")


@pytest.mark.slow
def test_judge_chosen_pairs_and_agreement_are_keyed_by_the_judge(tiny_run, tmp_path):
    """Another judge must not reuse pairs or agreement diagnostics made with the first one."""
    from icr.config import load_config
    from icr.evaluation.judges import get_judge
    from icr.loop import _agreement
    from icr.plan import iteration_plan
    from icr.stages import run_pairs

    scores = tiny_run / "iter1" / "score"
    cfg = load_config(TINY, [f"run_root={tmp_path}", "pairs.selection=judge", "evaluation.judge=fake"])
    other = load_config(TINY, [f"run_root={tmp_path}", "pairs.selection=judge", "evaluation.judge=fake",
                               "evaluation.judge_args={mode: hash}"])
    plan = iteration_plan(cfg, tmp_path / "run", 1)
    shutil.copytree(scores, plan.score_dir)
    assert "skipped" not in run_pairs(cfg, plan, judge=get_judge("fake"))
    assert run_pairs(cfg, plan, judge=get_judge("fake")).get("skipped")
    assert "skipped" not in run_pairs(other, plan, judge=get_judge("fake", mode="hash"))

    diag = tmp_path / "diagnostics" / "reward_agreement_iter1.json"
    _agreement(cfg, tmp_path, scores, 1, get_judge("fake"))
    first = diag.read_text()
    _agreement(other, tmp_path, scores, 1, get_judge("fake", mode="hash"))
    assert diag.read_text() != first and json.loads(diag.read_text())["key"]["judge_args"] == {"mode": "hash"}


def _one_line_error(code, err):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("icr: error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_config_exits_2_with_one_line(tmp_path, cli):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(TINY.read_text().replace("temperature: 0.9", "temperature: -1"))
    line = _one_line_error(*cli("run", cfg, "--set", f"run_root={tmp_path}")[::2])
    assert "generation.temperature: must be >= 0.0" in line
    assert not (tmp_path / "tiny").exists()


def test_missing_model_and_missing_prompts_write_nothing(tmp_path, cli, tiny_pair):
    base = TINY.read_text().split("prepare:")[0]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(base + f"models:\n  dpo: {tmp_path}/nope\n  sft: {tiny_pair['sft']}\n"
                   f"prompts:\n  path: {tiny_pair['root']}/prompts/train/{{lang}}.jsonl\n")
    line = _one_line_error(*cli("run", cfg, "--set", f"run_root={tmp_path}/runs")[::2])
    assert "models.dpo: model path" in line and "does not exist" in line
    cfg.write_text(base + f"models:\n  dpo: {tiny_pair['dpo']}\n  sft: {tiny_pair['sft']}\n"
                   f"prompts:\n  path: {tmp_path}/missing/{{lang}}.jsonl\n")
    line = _one_line_error(*cli("run", cfg, "--set", f"run_root={tmp_path}/runs")[::2])
    assert "prompt file not found" in line
    assert not (tmp_path / "runs").exists()


def test_tokenizer_mismatch_exits_2(tmp_path, cli, tiny_pair, other_tokenizer_model):
    base = TINY.read_text().split("prepare:")[0]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(base + f"models:\n  dpo: {tiny_pair['dpo']}\n  sft: {other_tokenizer_model}\n"
                   f"prompts:\n  path: {tiny_pair['root']}/prompts/train/{{lang}}.jsonl\n")
    line = _one_line_error(*cli("run", cfg, "--set", f"run_root={tmp_path}/runs")[::2])
    assert "different tokenizers" in line


def test_run_folder_with_other_config_refuses(tmp_path, cli, tiny_pair):
    from icr.config import load_config
    from icr.loop import check_run_folder
    from icr.errors import IcrError

    cfg = load_config(TINY, [f"run_root={tmp_path}"])
    check_run_folder(cfg, tmp_path / "tiny", force=False)
    (tmp_path / "tiny" / "iter1" / "generate").mkdir(parents=True)
    (tmp_path / "tiny" / "iter1" / "generate" / "manifest.json").write_text("{}")  # work done with cfg
    other = load_config(TINY, [f"run_root={tmp_path}", "generation.n=3"])
    with pytest.raises(IcrError, match="made with a different config"):
        check_run_folder(other, tmp_path / "tiny", force=False)
    check_run_folder(other, tmp_path / "tiny", force=True)
    assert not (tmp_path / "tiny" / "iter1").exists()
    check_run_folder(cfg, tmp_path / "tiny", force=False)  # nothing computed with `other`: no --force needed


def test_help_has_examples(cli):
    from icr.cli import build_parser

    parser = build_parser()
    assert "icr run configs/tiny.yaml" in parser.format_help()
    sub = parser._subparsers._group_actions[0].choices
    for name, p in sub.items():
        assert "example" in p.format_help(), name


@pytest.mark.slow
def test_run_with_evaluation_controls_and_diagnostics(tmp_path, cli):
    """Evaluation after each iteration, a random-pairs control, reward agreement, report: all wired."""
    code, _, err = cli(
        "run", TINY, "--set", f"run_root={tmp_path}", "--set", "iterations=1",
        "--set", "evaluation.enabled=true", "--set", "evaluation.judge=fake",
        "--set", "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl",
        "--set", "evaluation.max_new_tokens=16", "--set", "evaluation.reward_agreement=true",
        "--set", "controls=[{label: random-pairs, overrides: {pairs: {selection: random}}}]")
    assert code == 0, err
    run = tmp_path / "tiny"
    rows = json.loads((run / "results.json").read_text())
    assert {(r["model"], r["lang"]) for r in rows} == {
        (m, lang) for m in ("sft", "M0", "M1", "M1-random-pairs") for lang in ("en", "es", "de")}
    assert {r["iteration"] for r in rows if r["model"] == "sft"} == {-1}
    assert "random-pairs iter1 generate reused from the main run" in err
    control_pairs = (run / "controls/random-pairs/iter1/pairs/pairs.jsonl").read_text()
    assert control_pairs != (run / "iter1/pairs/pairs.jsonl").read_text()
    agreement = json.loads((run / "diagnostics/reward_agreement.json").read_text())
    assert set(agreement) == {"en", "es", "de"} and all(0 <= v["all"]["agree"] <= 1 for v in agreement.values())
    report = (run / "report.md").read_text()
    assert "M1-random-pairs" in report and "es WR" in report
