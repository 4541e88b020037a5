import json
from pathlib import Path

import pytest

from icr.config import EvaluationConfig
from icr.errors import IcrError
from icr.evaluation.evaluate import evaluate_model
from icr.evaluation.judges import FakeJudge
from icr.evaluation.results import FIELDS, append_results, read_results, validate_results
from icr.generation import Sample
from icr.report import write_report


def row(model="M1", lang="es", judge="fake", **kw):
    base = {"model": model, "iteration": 1, "lang": lang, "judge": judge, "n": 10, "wr": 55.0, "wr_se": 3.1,
            "lc": 52.5, "fidelity": 0.9, "mean_len": 812.3}
    return {**base, **kw}


# --- results.json -----------------------------------------------------------------------------

def test_validate_results_names_row_and_field():
    validate_results([row(), row(lang="de", lc=None, wr_se=None, fidelity=None)])
    cases = [({"wr": 101.0}, "'wr' is 101.0; expected number in [0, 100]"),
             ({"iteration": -2}, "'iteration' is -2"),
             ({"n": True}, "'n' is True"),
             ({"fidelity": 90}, "'fidelity' is 90; expected number in [0, 1]"),
             ({"mean_len": None}, "'mean_len' is None"),
             ({"lc": float("nan")}, "'lc' is nan"),
             ({"extra": 1}, "unknown field 'extra'")]
    for change, message in cases:
        with pytest.raises(IcrError, match=r"results row 1 \(M1, de, fake\): .*" + message.replace("(", r"\(")
                           .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            validate_results([row(), row(lang="de", **change)])
    missing = row()
    del missing["judge"]
    with pytest.raises(IcrError, match=r"results row 0: missing field 'judge'"):
        validate_results([missing])
    with pytest.raises(IcrError, match=r"same \(model, lang, judge\) as row 0"):
        validate_results([row(), row(wr=10.0)])


def test_append_results_replaces_by_key(tmp_path):
    path = tmp_path / "results.json"
    append_results(path, [row(), row(lang="de")])
    rows = append_results(path, [row(wr=70.0), row(model="M2", iteration=2), row(judge="oracle")])
    assert [(r["model"], r["lang"], r["judge"], r["wr"]) for r in rows] == [
        ("M1", "es", "fake", 70.0), ("M1", "de", "fake", 55.0), ("M2", "es", "fake", 55.0), ("M1", "es", "oracle", 55.0)]
    assert read_results(path) == rows and list(rows[0]) == list(FIELDS)
    append_results(path, [row(lang="ru", wr_se=float("nan"))])  # NaN is stored as null
    assert read_results(path)[-1]["wr_se"] is None
    with pytest.raises(IcrError, match="'wr' is -1"):
        append_results(path, [row(wr=-1)])
    assert len(read_results(path)) == 5  # a bad append leaves the file as it was
    path.write_text(json.dumps([row(n=0)]))
    with pytest.raises(IcrError, match=r"results.json: results row 0 .*'n' is 0"):
        read_results(path)


# --- evaluate_model ---------------------------------------------------------------------------

class EchoBackend:
    """Answers with the instruction repeated `times` times (so lengths are controllable)."""

    def __init__(self, times=2):
        self.times, self.calls, self.params = times, 0, None

    def generate(self, conversations, params, desc=None):
        self.calls += 1
        self.params = params
        return [[Sample(text=" ".join([c[-1]["content"]] * self.times), finished=True, n_tokens=3)]
                for c in conversations]

    def close(self):
        raise AssertionError("a backend passed in must not be closed")


class Ident:
    def identify_many(self, texts):
        return ["es" if "hola" in t else "en" for t in texts]


PROMPTS = {"es": [{"id": "1", "instruction": "hola uno"}, {"id": "2", "instruction": "dos"}],
           "en": [{"id": "1", "instruction": "one"}, {"id": "2", "instruction": "two two two"}]}
REFS = {"es": {"1": "x" * 12, "2": "x" * 3}, "en": {"1": "x" * 50, "2": "x" * 3}}


def test_evaluate_model_generates_exports_judges_and_resumes(tmp_path):
    backend, judge = EchoBackend(), FakeJudge()
    cfg = EvaluationConfig(max_new_tokens=64)
    out = tmp_path / "eval"
    rows = evaluate_model("some/model", "M1", 1, PROMPTS, REFS, judge, cfg, out, backend=backend, identifier=Ident())
    assert backend.calls == 2 and judge.calls == 4
    assert (backend.params.n, backend.params.temperature, backend.params.top_p, backend.params.max_new_tokens,
            backend.params.seed) == (1, 0.6, 0.9, 64, 42)
    validate_results(rows)
    es = next(r for r in rows if r["lang"] == "es")
    # "hola uno hola uno" (17) beats 12 x's; "dos dos" (7) beats 3 x's
    assert (es["model"], es["iteration"], es["n"], es["wr"], es["fidelity"]) == ("M1", 1, 2, 100.0, 0.5)
    assert es["mean_len"] == 12.0 and es["judge"] == "fake"
    en = next(r for r in rows if r["lang"] == "en")
    assert en["wr"] == 50.0 and en["fidelity"] == 1.0
    exported = json.loads((out / "M1" / "es" / "model_outputs.json").read_text())
    assert exported[0] == {"instruction": "hola uno", "output": "hola uno hola uno", "generator": "M1",
                           "dataset": "x_alpaca_eval", "id": "1"}
    assert json.loads((out / "M1" / "es" / "judgements.fake.json").read_text())[1] == {"id": "2", "preference": 1.0}

    # rerun: nothing regenerated, nothing re-judged
    judge2 = FakeJudge()
    again = evaluate_model("some/model", "M1", 1, PROMPTS, REFS, judge2, cfg, out, backend=backend, identifier=Ident())
    assert again == rows and backend.calls == 2 and judge2.calls == 0
    # other decoding settings: regenerate (and judge the new answers)
    evaluate_model("some/model", "M1", 1, PROMPTS, REFS, judge2, EvaluationConfig(max_new_tokens=32), out,
                   backend=EchoBackend(3), identifier=Ident())
    assert judge2.calls == 4


def test_evaluate_model_references_all_or_none(tmp_path):
    with pytest.raises(IcrError, match=r"1 of 2 es prompts have no reference output \(ids 2\)"):
        evaluate_model("m", "M0", 0, PROMPTS, {"es": {"1": "r"}, "en": REFS["en"]}, FakeJudge(), EvaluationConfig(),
                       tmp_path, backend=EchoBackend(), identifier=Ident())
    # no references for a language: judged against an empty answer, no LC
    rows = evaluate_model("m", "M0", 0, PROMPTS, {"en": REFS["en"]}, FakeJudge(), EvaluationConfig(), tmp_path,
                          backend=EchoBackend(), identifier=Ident())
    es = next(r for r in rows if r["lang"] == "es")
    assert es["wr"] == 100.0 and es["lc"] is None
    assert next(r for r in rows if r["lang"] == "en")["lc"] is not None


# --- report -----------------------------------------------------------------------------------

def _tiny_run(run: Path):
    cfg = EvaluationConfig()
    judge = FakeJudge()
    rows = []
    for label, it, times in (("sft", -1, 1), ("M0", 0, 2), ("M1", 1, 3), ("M1-random-pairs", 1, 1)):
        rows += evaluate_model("m", label, it, PROMPTS, REFS, judge, cfg, run / "eval", backend=EchoBackend(times),
                               identifier=Ident())
    append_results(run / "results.json", rows)
    for t in (1, 2):
        (run / f"iter{t}" / "pairs").mkdir(parents=True)
        (run / f"iter{t}" / "pairs" / "stats.json").write_text(json.dumps({"per_language": {
            lang: {"alpha": 0.01 * t, "n_prompts": 100, "n_pairs": 90 - t, "dropped_no_pair": 4, "dropped_filters": 6,
                   "chosen_len_mean": 420.5, "rejected_len_mean": 415.0, "chosen_fidelity": 0.97,
                   "alpha_curve": [[0.0, 80.0], [0.01, 12.0], [0.02, -30.0]]}
            for lang in ("es", "de")}}))
        for stage, sec in (("generate", 12.5), ("reward", 3.25), ("train", 40.0)):
            (run / f"iter{t}" / stage).mkdir()
            (run / f"iter{t}" / stage / "manifest.json").write_text(json.dumps({"seconds": sec * t}))
    (run / "controls" / "M1-random-pairs" / "iter1" / "train").mkdir(parents=True)
    (run / "controls" / "M1-random-pairs" / "iter1" / "train" / "manifest.json").write_text('{"seconds": 7}')
    (run / "diagnostics").mkdir()
    (run / "diagnostics" / "reward_agreement.json").write_text(json.dumps(
        {"es": {"oracle_pairs": {"agree": 0.8, "n": 50}, "random": {"agree": 0.55, "n": 40}}, "de": {"random": {}}}))


def test_report_renders_a_tiny_run(tmp_path):
    run = tmp_path / "runs" / "tiny"
    _tiny_run(run)
    text = write_report(run).read_text()
    assert "| Model | en LC | en WR | es LC | es WR | Avg LC | Avg WR |" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines[1:5]] == ["| sft", "| M0", "| M1", "| M1-random-pairs"]
    m1 = next(line for line in lines if line.startswith("| M1 |"))
    # M1 triples the instruction: en "one one one" (11) < 50 loses, the other three beat their references
    cells = m1.strip("| ").split(" | ")
    assert tuple(cells[i].split(" ± ")[0] for i in (2, 4, 6)) == ("50.0", "100.0", "75.0")
    # en's preferences (0, 1), es's (1, 1): per-prompt averages 0.5, 1 -> SE 25 points, t_{0.975,1} = 12.706
    assert cells[2] == "50.0 ± 635.3" and cells[6] == "75.0 ± 317.6"
    assert float(cells[5]) == pytest.approx((float(cells[1]) + float(cells[3])) / 2, abs=0.06)
    assert "| 1 | es | 0.01 | 100 | 89 | 4 | 6 | 420.5 | 415.0 | 97.0 |" in text
    assert "| 1 | es | 80.0 (n=50) | 55.0 (n=40) |" in text and "| 1 | de | – | – |" in text
    assert "| Stage | iter1 | iter2 | M1-random-pairs/iter1 | Total |" in text
    assert "| train | 40.0 | 80.0 | 7.0 | 127.0 |" in text and "| **total** | 55.8 | 111.5 | 7.0 | 174.2 |" in text
    for png in ("wr_by_iteration.fake.png", "alpha_curve_iter1.png", "alpha_curve_iter2.png"):
        assert f"]({png})" in text and (run / png).stat().st_size > 1000


def test_report_says_which_lc(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    append_results(run / "results.json", [row(lang="es")])  # written before lc_method existed: icr's GLM
    assert "LC from icr's minimal GLM" in write_report(run).read_text()
    append_results(run / "results.json", [row(lang="es", lc_method="alpaca_eval:length_controlled_v1")])
    text = write_report(run).read_text()
    assert "LC computed by alpaca_eval (length_controlled_v1" in text and "minimal GLM" not in text
    with pytest.raises(IcrError, match="'lc_method' is 'mine'"):
        validate_results([row(lc_method="mine")])


def test_report_renders_partial_runs(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    assert "Nothing to report yet" in write_report(run).read_text()
    (run / "iter1" / "pairs").mkdir(parents=True)
    (run / "iter1" / "pairs" / "stats.json").write_text("{not json")
    (run / "iter1" / "generate").mkdir()
    (run / "iter1" / "generate" / "manifest.json").write_text(json.dumps({"seconds": 2}))
    (run / "diagnostics").mkdir()
    (run / "diagnostics" / "reward_agreement.json").write_text("[]")
    text = write_report(run).read_text()
    assert "## Time per stage" in text and "## Preference pairs" not in text and "Win rates" not in text
    # a model evaluated on fewer languages is flagged in the average
    append_results(run / "results.json", [row(model="M0", iteration=0, lang="es"), row(model="M0", iteration=0,
                                                                                      lang="de"), row(lang="es")])
    assert "† averaged over the languages evaluated" in write_report(run).read_text()
    with pytest.raises(IcrError, match="no such run folder"):
        write_report(tmp_path / "nope")


def test_evaluation_samples_through_the_configured_backend(tmp_path, monkeypatch):
    """icr evaluate / icr run's one evaluation path: generation.backend (here a stand-in registered as
    vllm) with the evaluation decoding and batch size; rows recorded in results.json."""
    from icr import generation
    from icr.config import config_from_dict
    from icr.evaluation.evaluate import Evaluator

    for lang in ("en", "es"):
        (tmp_path / f"{lang}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[lang]))
        (tmp_path / f"{lang}.ref.json").write_text(json.dumps(
            [{"id": int(k), "instruction": next(p["instruction"] for p in PROMPTS[lang] if p["id"] == k), "output": v,
              "generator": "ref", "dataset": "d"} for k, v in REFS[lang].items()]))
    cfg = config_from_dict({
        "name": "t", "run_root": str(tmp_path / "runs"), "languages": ["en", "es"], "device": "cpu",
        "models": {"dpo": "dpo-path", "sft": "sft-path", "dtype": "bfloat16"},
        "prompts": {"path": str(tmp_path / "{lang}.jsonl")},
        "generation": {"backend": "vllm", "batch_size": 3, "temperature": 1.3, "tensor_parallel_size": 2,
                       "gpu_memory_utilization": 0.5},
        "evaluation": {"enabled": True, "prompts": {"path": str(tmp_path / "{lang}.jsonl")}, "batch_size": 7,
                       "references": str(tmp_path / "{lang}.ref.json"), "judge": "fake", "max_new_tokens": 33}})
    loaded = []

    class Owned(EchoBackend):
        def close(self):
            self.closed = True

    def stand_in(model_path, **options):
        loaded.append((model_path, options))
        return Owned(1 if "sft" in model_path else 3)

    monkeypatch.setitem(generation.BACKENDS, "vllm", stand_in)
    evaluate = Evaluator(cfg, cfg.run_dir, FakeJudge(), cfg.run_dir / "results.json")
    rows = evaluate("sft-path", "sft", -1) + evaluate("dpo-path", "M0", 0)
    assert [path for path, _ in loaded] == ["sft-path", "dpo-path"] and len(rows) == 4
    assert loaded[0][1] == {"device": "cpu", "dtype": "bfloat16", "chat_template": None, "batch_size": 7,
                            "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5}
    stored = read_results(tmp_path / "runs" / "t" / "results.json")
    assert stored == rows and {(r["model"], r["lang"]) for r in stored} == {
        ("sft", "en"), ("sft", "es"), ("M0", "en"), ("M0", "es")}
    outputs = json.loads((tmp_path / "runs" / "t" / "eval" / "M0" / "es" / "model_outputs.json").read_text())
    assert outputs[0]["output"] == "hola uno hola uno hola uno"
    generated = json.loads((tmp_path / "runs" / "t" / "eval" / "M0" / "es" / "generation.json").read_text())
    assert generated["key"]["params"] == {"n": 1, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 33, "seed": 42}
    # evaluated again: answers on disk, no backend loaded
    evaluate("dpo-path", "M0", 0)
    assert len(loaded) == 2


def test_plot_of_a_run_without_lc_has_its_legend_and_no_warning(tmp_path):
    """Reference-free languages have no LC: the language legend moves to the WR panel instead of
    matplotlib warning about an empty one."""
    import warnings

    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    append_results(run / "results.json", [row(model=m, iteration=t, lang=lang, lc=None, lc_method=None)
                                          for m, t in (("sft", -1), ("M0", 0)) for lang in ("en", "es")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = write_report(run).read_text()
    assert "![WR across iterations](wr_by_iteration.fake.png)" in text
    assert (run / "wr_by_iteration.fake.png").is_file()


def test_languages_judged_without_references_stay_out_of_the_average(tmp_path):
    """A language without references is judged against an empty answer (no LC): its WR is not
    comparable, so it is marked and not averaged with the languages that have references."""
    run = tmp_path / "run"
    run.mkdir()
    append_results(run / "results.json", [row(lang="es", wr=40.0, lc=40.0), row(lang="de", wr=60.0, lc=60.0),
                                          row(lang="sw", wr=100.0, lc=None)])
    text = write_report(run).read_text()
    line = next(x for x in text.splitlines() if x.startswith("| M1 "))
    # no judgements in the run folder: the interval assumes independent languages (§), 2.262 · (2 · 3.1²)^½ / 2
    assert line.rstrip(" |").endswith("50.0 ± 5.0 ‡ §") and "66.7" not in line
    assert "‡ sw judged without references" in text



# --- issue 21: the win-rate table says only what its numbers support -------------------------------

def _judged(run: Path, model: str, lang: str, prefs: dict[str, float], judge: str = "fake", control: str = ""):
    """judgements.<judge>.json as icr.evaluation.evaluate writes it, and the results row it gives."""
    base = run / "controls" / control if control else run
    (base / "eval" / model / lang).mkdir(parents=True)
    (base / "eval" / model / lang / f"judgements.{judge}.json").write_text(json.dumps(
        [{"id": i, "preference": p} for i, p in prefs.items()]))
    n, wr = len(prefs), 100 * sum(prefs.values()) / len(prefs)
    se = 100 * (sum((p - wr / 100) ** 2 for p in prefs.values()) / (n - 1)) ** 0.5 / n ** 0.5
    return row(model=model, lang=lang, n=n, wr=wr, wr_se=se, lc=50.0)


def test_lc_at_its_bounds_is_a_dash_and_a_judge_without_meaningful_lc_has_no_lc_columns(tmp_path):
    from icr.report_html import page_data

    run = tmp_path / "run"
    run.mkdir()
    # 2 of 4 LC values inside (0.5, 99.5): LC columns stay, the two at the bounds print as –
    append_results(run / "results.json", [row(model="M0", iteration=0, lang="es", lc=100.0), row(model="M0",
                   iteration=0, lang="de", lc=40.0), row(lang="es", lc=45.0), row(lang="de", lc=0.2)])
    text = write_report(run).read_text()
    m0 = next(x for x in text.splitlines() if x.startswith("| M0 ")).strip("| ").split(" | ")
    m1 = next(x for x in text.splitlines() if x.startswith("| M1 ")).strip("| ").split(" | ")
    assert (m0[1], m0[3], m0[5]) == ("–", "40.0", "–") and (m1[1], m1[3], m1[5]) == ("45.0", "–", "–")
    assert "100.0" not in " ".join(m0) and "0.2" not in " ".join(m1)
    assert "LC – : within 0.5 points of 0 or 100" in text and "Avg LC is – when any language" in text
    table = next(b for b in page_data(run)["overview"] if b["kind"] == "table")  # the HTML page: the same cells
    assert table["rows"][0][1] == "–" and table["rows"][1][3] == "–"
    # 1 of 4 inside: not meaningful, so no LC columns at all, and one line says why
    append_results(run / "results.json", [row(lang="es", lc=99.9)])
    text = write_report(run).read_text()
    assert "| Model | es WR | de WR | Avg WR |" in text and " LC |" not in text
    assert "No LC columns: fewer than half of this judge's LC values lie inside (0.5, 99.5)" in text


def test_average_win_rate_interval_is_clustered_by_prompt(tmp_path):
    """3 prompts × 2 languages, by hand: en (1, 0, 1), de (1, 0, 0) -> per-prompt averages (1, 0, 0.5),
    mean 50, SE = sd / √3 = 0.5 / √3 = 28.87 points (independent languages would say (2 · 33.33²)^½ / 2 =
    23.57); 95% half-width t_{0.975,2} · SE = 4.303 · 28.87 = 124.2."""
    from icr.report import average_wr, read_judgements, wr_series

    run = tmp_path / "run"
    run.mkdir()
    rows = [_judged(run, "M1", "en", {"a": 1.0, "b": 0.0, "c": 1.0}), _judged(run, "M1", "de", {"a": 1.0, "b": 0.0,
                                                                                                  "c": 0.0}),
            _judged(run, "M1-random-pairs", "en", {"a": 1.0, "b": 0.0, "c": 1.0}, control="random-pairs"),
            _judged(run, "M1-random-pairs", "de", {"a": 1.0, "b": 0.0, "c": 0.0}, control="random-pairs")]
    rows[2:] = [{**r, "model": "M1-random-pairs"} for r in rows[2:]]
    append_results(run / "results.json", rows)
    judgements = read_judgements(run, "fake")
    assert set(judgements) == {("M1", "en"), ("M1", "de"), ("M1-random-pairs", "en"), ("M1-random-pairs", "de")}
    avg = average_wr(rows[:2], judgements)
    assert avg["how"] == "clustered" and avg["mean"] == pytest.approx(50.0)
    assert avg["se"] == pytest.approx(50 / 3 ** 0.5) and avg["half"] == pytest.approx(4.303 * 50 / 3 ** 0.5)
    assert average_wr(rows[:2])["se"] == pytest.approx((2 * (100 / 3) ** 2) ** 0.5 / 2)  # no judgements: independent
    text = write_report(run).read_text()
    for model in ("M1", "M1-random-pairs"):
        line = next(x for x in text.splitlines() if x.startswith(f"| {model} "))
        assert line.rstrip(" |").endswith(" | 50.0 ± 124.2"), line
        assert "| 66.7 ± 143.4 |" in line  # per language: t_{0.975,2} · 33.33
    assert "§" not in text and "its SE clustered by prompt id, as in the table" in text
    assert wr_series(rows, "wr", judgements)[("ICR", "avg")] == [(1, pytest.approx(50.0), pytest.approx(50 / 3 ** 0.5))]


def test_average_win_rate_falls_back_to_independent_languages_and_says_so(tmp_path):
    from icr.report import average_wr, read_judgements

    run = tmp_path / "run"
    run.mkdir()
    # no prompt id shared by the two languages: nothing to cluster
    rows = [_judged(run, "M1", "en", {"a": 1.0, "b": 0.0, "c": 1.0}), _judged(run, "M1", "de", {"x": 1.0, "y": 0.0,
                                                                                                  "z": 0.0})]
    append_results(run / "results.json", rows)
    avg = average_wr(rows, read_judgements(run, "fake"))
    assert avg["how"] == "independent" and avg["se"] == pytest.approx((2 * (100 / 3) ** 2) ** 0.5 / 2)
    text = write_report(run).read_text()
    line = next(x for x in text.splitlines() if x.startswith("| M1 "))
    assert line.rstrip(" |").endswith(" | 50.0 ± 101.4 §"), line  # 4.303 · 23.57
    assert "§ interval assuming independent languages" in text and "share no prompt id" in text
    assert "else assuming independent languages" in text  # the plot's note too
    # judgements that do not match results.json (another judging) are not used either
    append_results(run / "results.json", [{**rows[1], "wr": 50.0}])
    (run / "eval" / "M1" / "de" / "judgements.fake.json").write_text(json.dumps(
        [{"id": i, "preference": p} for i, p in {"a": 1.0, "b": 0.0, "c": 0.0}.items()]))
    assert average_wr([rows[0], {**rows[1], "wr": 50.0}], read_judgements(run, "fake"))["how"] == "independent"


def test_control_agreement_rows_identical_to_the_main_runs_are_named_not_repeated(tmp_path):
    run = tmp_path / "run"
    agreement = {"es": {"all": {"agree": 0.625, "n": 80}}, "de": {"all": {"agree": 0.5, "n": 64}}}
    other = {"es": {"all": {"agree": 0.625, "n": 81}}, "de": {"all": {"agree": 0.5, "n": 64}}}
    for base, data in ((run, agreement), (run / "controls" / "random-pairs", agreement),
                       (run / "controls" / "oracle-pairs", other)):
        (base / "diagnostics").mkdir(parents=True)
        (base / "diagnostics" / "reward_agreement_iter1.json").write_text(json.dumps({"agreement": data}))
    text = write_report(run).read_text()
    table = [x for x in text.splitlines() if x.startswith("| ")]
    assert [x.split(" | ")[0] for x in table[1:]] == ["| 1", "| 1", "| oracle-pairs/1", "| oracle-pairs/1"]
    assert "Iteration 1's rows are also those of random-pairs/1: identical numbers" in text
    assert "The rows of iteration t come from iteration t's samples" in text and "Iterations in this table: 1." in text
