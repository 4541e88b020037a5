"""bench/sandbox_qualities.py: the oracle's qualities of a finished sandbox run's evaluated answers,
per model (controls included) and language, read from the run folder alone."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from .conftest import REPO


def test_qualities_of_evaluated_answers(tmp_path):
    from icr.runs import write_json
    from icr.sandbox.world import build_world

    world_dir = tmp_path / "world"
    world_dir.mkdir()
    write_json(world_dir / "world.json", build_world(0, 2, 1, 1, 1, 1).to_json())
    tasks = json.loads((world_dir / "world.json").read_text())["tasks"]
    tid, task = next((k, v) for k, v in tasks.items() if k.startswith("eval-"))
    answer = int(task["answer"])
    run = tmp_path / "run"
    (run / "eval" / "M0" / "es").mkdir(parents=True)
    (run / "controls" / "random-pairs" / "eval" / "M1-random-pairs" / "es").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"evaluation": {"judge_args": {"world_dir": str(world_dir)}}}))
    outputs = [f"Respuesta: {answer}.", f"Answer: {answer + 1}."]  # right in Spanish; wrong, in English
    for d in (run / "eval" / "M0" / "es", run / "controls" / "random-pairs" / "eval" / "M1-random-pairs" / "es"):
        (d / "model_outputs.json").write_text(json.dumps([{"id": tid, "output": o} for o in outputs]))
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sandbox_qualities.py"), str(run), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"M0", "M1-random-pairs"}
    es = res["M0"]["es"]
    assert (es["well_formed"], es["correct"], es["language"], es["n"]) == (1.0, 0.5, 0.5, 2)
    assert "| M0 | 0.50 / 0.50 /" in proc.stdout
