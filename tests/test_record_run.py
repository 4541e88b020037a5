"""bench/record_run.py: a finished run's files and its cost (summed wall time, largest peak memory
over the attempts of a resumed run) land under docs/results/<name>/; an unfinished run is refused."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO

TIME_V = """\tCommand being timed: "make demo-gemma"
\tElapsed (wall clock) time (h:mm:ss or m:ss): {wall}
\tMaximum resident set size (kbytes): {rss}
\tExit status: {status}
"""


def _run(*args):
    return subprocess.run([sys.executable, str(REPO / "bench" / "record_run.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_record_sums_attempts_and_copies_the_run(tmp_path):
    run, prepared, out = tmp_path / "run", tmp_path / "prepared", tmp_path / "out"
    run.mkdir()
    prepared.mkdir()
    (run / "results.json").write_text("[]\n")
    (run / "report.md").write_text("# report\n")
    (run / "wr.png").write_bytes(b"png")
    (run / "diagnostics").mkdir()
    (run / "diagnostics" / "reward_agreement_iter2.json").write_text('{"en": {}}\n')
    (prepared / "premise.json").write_text('{"on_policy": {}}\n')
    (prepared / "timings.json").write_text('{"sft_s": 1}\n')
    t1, t2 = tmp_path / "t1.txt", tmp_path / "t2.txt"
    t1.write_text(TIME_V.format(wall="1:10:05", rss=4_000_000, status=137))  # killed, resumed
    t2.write_text(TIME_V.format(wall="45:30.5", rss=5_242_880, status=0))
    proc = _run(run, out, "--prepared", prepared, "--time", t1, "--time", t2, "--command", "make demo-gemma")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["wall_s_total"] == 4205.0 + 2730.5
    assert info["peak_rss_mib"] == 5120.0
    assert [a["exit_status"] for a in info["attempts"]] == [137, 0]
    assert sorted(p.name for p in out.iterdir()) == ["build_timings.json", "diagnostics", "premise.json",
                                                     "report.md", "results.json", "run.json", "wr.png"]
    assert (out / "diagnostics" / "reward_agreement_iter2.json").read_text() == '{"en": {}}\n'


def test_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("[]\n")
    proc = _run(tmp_path / "run", tmp_path / "out", "--command", "x")
    assert proc.returncode != 0 and "report.md is missing" in proc.stderr
    assert not (tmp_path / "out").exists()
