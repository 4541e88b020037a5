"""A run folder holds one config's work: commands that share it are checked against its config and
its lock; --force deletes only what icr wrote; a failed start or a longer run needs no --force."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from icr.errors import IcrError
from icr.runs import SHARED_LOCKS, run_lock

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"


def _one_line_error(code, err):
    """The one error line (a command that loaded a model first also printed its progress bars)."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if "icr: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- the lock -----------------------------------------------------------------------------------

def test_shared_holders_of_one_config_run_together_and_another_config_is_refused(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, "A", shared=True):
        with run_lock(run, "A", shared=True):  # another shard of the same config
            with run_lock(run, "A"):  # icr run / train of the same config beside them
                pass
        with pytest.raises(IcrError, match="in use with a different config"):
            with run_lock(run, "B", shared=True):
                pass
        with pytest.raises(IcrError, match="in use with a different config"):
            with run_lock(run, "B"):
                pass
        assert not (run / ".lock").exists()  # the refused exclusive holder let go
    assert list((run / SHARED_LOCKS).iterdir()) == []


def test_an_exclusive_holder_refuses_another_config_and_another_exclusive_holder(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, "A"):
        with pytest.raises(IcrError, match="in use with a different config"):
            with run_lock(run, "B", shared=True):
                pass
        with pytest.raises(IcrError, match="in use by process"):
            with run_lock(run, "A"):  # two icr train of one config would train into one folder
                pass
        with run_lock(run, "A", shared=True):
            pass


def test_a_dead_shared_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / SHARED_LOCKS).mkdir(parents=True)
    stale = run / SHARED_LOCKS / "x.json"
    stale.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "config": "B"}))
    with run_lock(run, "A"):
        pass
    assert not stale.exists()


# --- through the CLI ------------------------------------------------------------------------------

@pytest.fixture()
def built(tiny_pair, monkeypatch):
    """The tiny config's prepare step already built (so each command here does only its own work)."""
    from icr.config import load_config
    from icr.loop import run_prepare

    run_prepare(load_config(TINY))


def test_a_stage_command_with_another_config_is_refused_and_writes_nothing(tmp_path, cli, built):
    sets = ["--set", f"run_root={tmp_path}", "--set", "name=race"]
    code, _, err = cli("generate", TINY, *sets, "--iteration", "1")
    assert code == 0, err
    shards = sorted(p.name for p in (tmp_path / "race" / "iter1" / "generate").glob("shard-*"))
    code, _, err = cli("score", TINY, *sets, "--set", "generation.temperature=0.5", "--iteration", "1")
    assert "made with a different config" in _one_line_error(code, err)
    code, _, err = cli("generate", TINY, *sets, "--set", "generation.temperature=0.5", "--iteration", "1",
                       "--shard", "0/2")
    assert "made with a different config" in _one_line_error(code, err)
    assert not (tmp_path / "race" / "iter1" / "score").exists()
    assert sorted(p.name for p in (tmp_path / "race" / "iter1" / "generate").glob("shard-*")) == shards
    assert "temperature: 0.9" in (tmp_path / "race" / "config.yaml").read_text()


def test_a_stage_command_beside_a_run_of_another_config_is_refused(tmp_path, cli, built):
    from icr.config import load_config
    from icr.loop import config_digest, resolve_placeholders, run_prepare

    other = load_config(TINY, [f"run_root={tmp_path}", "name=race", "generation.temperature=0.5"])
    with run_lock(tmp_path / "race", config_digest(resolve_placeholders(other, run_prepare(other)))):
        code, _, err = cli("generate", TINY, "--set", f"run_root={tmp_path}", "--set", "name=race",
                           "--iteration", "1", "--shard", "0/2")
    assert "in use with a different config" in _one_line_error(code, err)
    assert not (tmp_path / "race" / "iter1").exists()


def test_force_deletes_only_what_icr_wrote(tmp_path, cli, built):
    run = tmp_path / "runs" / "mine"
    sets = ["--set", f"run_root={tmp_path / 'runs'}", "--set", "name=mine", "--set", "iterations=1",
            "--set", "evaluation.enabled=false"]
    assert cli("generate", TINY, *sets, "--iteration", "1")[0] == 0
    (run / "precious.txt").write_text("mine")
    (run / "data").mkdir()
    (run / "data" / "thesis.tex").write_text("\\begin{document}")
    (run / "iter1" / "notes.md").write_text("inside a folder icr wrote: goes with it")
    code, _, err = cli("run", TINY, *sets, "--set", "generation.n=2")
    assert "--force" in _one_line_error(code, err)
    code, _, err = cli("run", TINY, *sets, "--set", "generation.n=2", "--force")
    assert code == 0, err
    assert (run / "precious.txt").read_text() == "mine"
    assert (run / "data" / "thesis.tex").read_text() == "\\begin{document}"
    assert not (run / "iter1" / "notes.md").exists()
    assert "kept what icr did not write: data, precious.txt" in err
    assert "n: 2" in (run / "config.yaml").read_text()


def test_a_failed_start_does_not_block_the_corrected_rerun(tmp_path, cli, built):
    sets = ["--set", f"run_root={tmp_path}", "--set", "name=first", "--set", "iterations=1",
            "--set", "evaluation.enabled=false"]
    (tmp_path / "first").mkdir()
    # what a start that failed in its first stage leaves: the run's config and an unfinished stage folder
    (tmp_path / "first" / "config.yaml").write_text("name: first\ngeneration: {temperature: 0.1}\n")
    (tmp_path / "first" / "iter1" / "generate").mkdir(parents=True)
    code, _, err = cli("run", TINY, *sets)
    assert code == 0, err
    assert "nothing was computed with its old config" in err


def test_a_finished_run_extends_to_more_iterations_without_force(tmp_path, cli, built):
    sets = ["--set", f"run_root={tmp_path}", "--set", "name=grow", "--set", "evaluation.enabled=false"]
    assert cli("run", TINY, *sets, "--set", "iterations=1")[0] == 0
    first = (tmp_path / "grow" / "iter1" / "train" / "manifest.json").read_text()
    code, _, err = cli("run", TINY, *sets, "--set", "iterations=2")
    assert code == 0, err
    assert "extending the run from 1 to 2 iterations" in err
    assert (tmp_path / "grow" / "iter1" / "train" / "manifest.json").read_text() == first  # kept, not redone
    assert (tmp_path / "grow" / "iter2" / "model").is_dir()
    code, _, err = cli("run", TINY, *sets, "--set", "iterations=1")  # fewer: iter2 would not belong to it
    assert "made with a different config" in _one_line_error(code, err)
    assert os.path.isdir(tmp_path / "grow" / "iter2" / "model")


def _cut_last_line(path):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))


def test_a_shard_cut_at_a_line_boundary_is_found_not_used(tmp_path, cli, built):
    """A shard's completeness comes from what the stage knows it must hold (n samples of each
    prompt it kept; a score for every sample), not from the file parsing."""
    sets = ["--set", f"run_root={tmp_path}", "--set", "name=cut", "--set", "generation.shard_size=2"]
    gen = tmp_path / "cut" / "iter1" / "generate"
    assert cli("generate", TINY, *sets, "--iteration", "1", "--shard", "0/2")[0] == 0
    _cut_last_line(gen / "shard-00000.jsonl")
    code, _, err = cli("generate", TINY, *sets, "--iteration", "1", "--shard", "1/2")  # the last worker joins
    assert "shard-00000.jsonl: damaged shard" in _one_line_error(code, err)
    assert not (gen / "manifest.json").exists()
    (gen / "shard-00000.jsonl").unlink()  # as the message says: delete it and rerun
    assert cli("generate", TINY, *sets, "--iteration", "1")[0] == 0

    score = tmp_path / "cut" / "iter1" / "score"
    assert cli("score", TINY, *sets, "--iteration", "1", "--shard", "0/2")[0] == 0
    _cut_last_line(score / "shard-00000.jsonl")
    code, _, err = cli("score", TINY, *sets, "--iteration", "1", "--shard", "1/2")
    assert "shard-00000.jsonl: damaged shard" in _one_line_error(code, err)
    (score / "shard-00000.jsonl").unlink()
    assert cli("score", TINY, *sets, "--iteration", "1")[0] == 0
    _cut_last_line(score / "shard-00001.jsonl")  # damaged after the stage finished
    code, _, err = cli("pairs", TINY, *sets, "--iteration", "1")
    assert "its manifest says" in _one_line_error(code, err)
    assert not (tmp_path / "cut" / "iter1" / "pairs").exists()


def test_a_language_without_pairs_is_a_warning_with_its_reason(tmp_path, caplog):
    """Every German answer is English: the language filter leaves no pair, and the log says so
    (before: only `pairs_de: 0` in the manifest)."""
    import logging

    from icr.config import load_config
    from icr.plan import iteration_plan
    from icr.runs import write_json, write_jsonl
    from icr.stages import run_pairs

    cfg = load_config(TINY, [f"run_root={tmp_path}", "pairs.language_filter=true"])
    plan = iteration_plan(cfg, tmp_path / "run", 1)
    answers = {"en": ["The capital of France is Paris.", "Paris is the capital city of France, of course."],
               "de": ["The capital of France is Paris.", "Paris is the capital city of France, of course."]}
    records = [{"id": f"p{k}", "lang": lang, "prompt": "q", "sample": j, "response": text, "finished": True,
                "n_tokens": 9, "reward": float(j + k)} for lang in answers for k in range(3)
               for j, text in enumerate(answers[lang])]
    write_jsonl(plan.score_dir / "shard-00000.jsonl", records)
    write_json(plan.score_dir / "manifest.json", {"key": {"x": 1}, "counts": {"scored": len(records)}})
    icr_log = logging.getLogger("icr")  # the CLI's handler may have stopped it propagating to caplog's
    icr_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="icr"):
            counts = run_pairs(cfg, plan)
    finally:
        icr_log.removeHandler(caplog.handler)
    assert counts["pairs_de"] == 0 and counts["pairs_en"] == 3
    warned = [r.getMessage() for r in caplog.records if "no pair for" in r.getMessage()]
    assert len(set(warned)) == 1 and warned[0].startswith("pairs: no pair for de, so it is not trained")
    assert "3 with fewer than two answers left after the filters [language on" in warned[0]


@pytest.mark.parametrize("label", ["../../x", "/abs", "a/b", "..", ".hidden", ""])
def test_an_evaluate_label_is_a_folder_name(tmp_path, cli, label):
    code, _, err = cli("evaluate", TINY, "--set", f"run_root={tmp_path}", "--model", "m", "--label", label)
    assert "--label: must be one folder name" in _one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


def test_an_iteration_model_changed_in_place_is_not_built_on(tmp_path, cli, built):
    """iter1/model zeroed in place (same size, same modification time): iteration 2 refuses it
    (the train manifest records its weights' digests) instead of sampling from it."""
    sets = ["--set", f"run_root={tmp_path}", "--set", "name=z", "--set", "evaluation.enabled=false"]
    assert cli("run", TINY, *sets, "--set", "iterations=1")[0] == 0
    weights = tmp_path / "z" / "iter1" / "model" / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as fh:  # the header stays, the tensors become zeros
        header = 8 + int.from_bytes(fh.read(8), "little")
        fh.seek(header)
        fh.write(bytes(st.st_size - header))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, _, err = cli("run", TINY, *sets, "--set", "iterations=2")
    line = _one_line_error(code, err)
    assert "iter1/model: its weights are not the ones iter1's training saved (model.safetensors changed)" in line
    assert not (tmp_path / "z" / "iter2").exists()


def test_commands_differing_only_in_placement_share_the_run_folder(tmp_path, cli, built):
    """Where a stage runs (workers, isolate_stages, cluster) and who watches (report_to) change no
    output: a resume or another node with other placement is not 'a different config'."""
    sets = ["--set", f"run_root={tmp_path}", "--set", "name=placed", "--iteration", "1"]
    assert cli("generate", TINY, *sets)[0] == 0
    saved = (tmp_path / "placed" / "config.yaml").read_text()
    code, _, err = cli("score", TINY, *sets, "--set", "workers=3", "--set", "isolate_stages=true",
                       "--set", "cluster.task_retries=5", "--set", "report_to=[tensorboard]")
    assert code == 0, err
    assert (tmp_path / "placed" / "config.yaml").read_text() == saved  # the first command's record stays
    from icr.config import load_config
    from icr.loop import config_digest

    assert config_digest(load_config(TINY, ["workers=3", "cluster.backend=ray"])) == config_digest(load_config(TINY))
    assert config_digest(load_config(TINY, ["seed=1"])) != config_digest(load_config(TINY))
