import math

import numpy as np
import pytest

from icr.evaluation.metrics import fidelity, length_controlled_win_rate, mean_length, win_rate


def test_win_rate_with_ties_and_standard_error():
    wr, se = win_rate([1, 0, 0.5, 1])
    assert wr == pytest.approx(62.5)
    # sample sd (ddof=1) of [1, 0, .5, 1] = sqrt(((.375^2)*2 + .625^2 + .125^2) / 3) = 0.4787; / sqrt(4)
    assert se == pytest.approx(100 * math.sqrt((2 * 0.375**2 + 0.625**2 + 0.125**2) / 3) / 2)
    assert win_rate([0.5] * 3) == (50.0, 0.0)
    assert math.isnan(win_rate([1])[1])


def test_win_rate_rejects_bad_preferences():
    for bad in ([], [1.5], [float("nan")], [-0.1]):
        with pytest.raises(ValueError):
            win_rate(bad)


def _length_only(n, shift, seed):
    """Outputs longer than references by `shift` on average; preference depends only on length."""
    rng = np.random.default_rng(seed)
    ref = rng.integers(300, 2000, n)
    out = np.maximum(ref + rng.normal(shift, 400, n).astype(int), 1)
    delta = out - ref
    p = 1 / (1 + np.exp(-2.0 * np.tanh(delta / delta.std(ddof=1))))
    return p, out, ref, rng


def test_lc_is_50_when_preference_depends_only_on_length():
    p, out, ref, rng = _length_only(805, shift=500, seed=0)
    # Soft targets equal to the true probabilities: the MLE recovers intercept 0 exactly.
    assert win_rate(p)[0] > 70  # the raw win rate rewards the longer answers...
    assert length_controlled_win_rate(p, out, ref) == pytest.approx(50.0, abs=0.01)  # ...LC does not
    # Sampled hard judgements: LC near 50 up to sampling noise.
    y = (rng.random(len(p)) < p).astype(float)
    assert win_rate(y)[0] > 65
    assert length_controlled_win_rate(y, out, ref) == pytest.approx(50.0, abs=4)


def test_lc_recovers_a_known_intercept():
    p, out, ref, _ = _length_only(400, shift=-300, seed=1)
    delta = out - ref
    p = 1 / (1 + np.exp(-(0.8 + 1.5 * np.tanh(delta / delta.std(ddof=1)))))
    assert length_controlled_win_rate(p, out, ref) == pytest.approx(100 / (1 + math.exp(-0.8)), abs=0.01)


def test_lc_degenerate_cases_stay_finite():
    # separable (all wins): ridge keeps it finite and near 100
    assert 99 < length_controlled_win_rate([1] * 20, range(20), [10] * 20) <= 100
    # equal lengths: no length term, LC = WR
    assert length_controlled_win_rate([1, 0, 0.5, 1], [5] * 4, [3] * 4) == pytest.approx(62.5, abs=0.05)
    assert length_controlled_win_rate([1], [5], [3]) > 99
    with pytest.raises(ValueError):
        length_controlled_win_rate([1, 0], [1], [1, 2])


def test_lc_matches_alpaca_eval_offline(tmp_path, monkeypatch):
    """Same GLM as alpaca_eval's `length_controlled_minimal`, run offline with a stand-in
    difficulty file (that GLM does not use it). Exact without alpaca_eval's cross-validated L1
    penalty; close with it."""
    try:
        import pandas as pd
        from alpaca_eval.metrics import glm_winrate
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"alpaca_eval not importable ({type(e).__name__}: {e}); "
                    "pip install 'alpaca-eval==0.6.6' 'setuptools>=77.0.3,<81' to run this comparison")
    rng = np.random.default_rng(3)
    n = 805
    ref = rng.integers(200, 3000, n)
    out = rng.integers(100, 4000, n)
    delta = out - ref
    p = 1 / (1 + np.exp(-(0.4 + 1.2 * np.tanh(delta / delta.std(ddof=1)))))
    y = (rng.random(n) < p).astype(float)
    y[rng.random(n) < 0.1] = 0.5
    gamed = tmp_path / "df_gamed.csv"
    pd.DataFrame({"model": "x", "index": range(n), "instruction_difficulty": 0.0}).to_csv(gamed, index=False)
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kw: str(gamed))
    df = pd.DataFrame({"preference": y + 1, "output_1": ["r" * int(v) for v in ref],
                       "output_2": ["o" * int(v) for v in out], "generator_1": "ref",
                       "generator_2": "model", "annotator": "fake"})
    ours = length_controlled_win_rate(y, out, ref)
    no_cv = dict(glm_winrate.GLM_INFO["length_controlled_minimal"], kwargs={"n_splits": 0, "C": 1e6})
    exact = glm_winrate.get_length_controlled_winrate(df.copy(), glm_info=no_cv, save_weights_dir=None)
    assert ours == pytest.approx(exact["length_controlled_winrate"], abs=0.01)
    assert win_rate(y)[0] == pytest.approx(exact["win_rate"], abs=1e-9)
    assert win_rate(y)[1] == pytest.approx(exact["standard_error"], abs=1e-9)
    with_cv = glm_winrate.get_length_controlled_winrate(
        df.copy(), glm_name="length_controlled_minimal", save_weights_dir=None)
    assert ours == pytest.approx(with_cv["length_controlled_winrate"], abs=0.5)


class _FakeIdentifier:
    def __init__(self):
        self.seen = []

    def identify_many(self, texts):
        self.seen.extend(texts)
        return ["es" if "hola" in t else ("en" if "hello" in t else None) for t in texts]


def test_fidelity_and_mean_length():
    ident = _FakeIdentifier()
    outs = ["hola amigo", "hello friend", "123 + 4", "hola", "???"]
    # "123 + 4" and "???" have no letters: in-language, not sent to the identifier
    assert fidelity(outs, "es", ident) == pytest.approx(4 / 5)
    assert ident.seen == ["hola amigo", "hello friend", "hola"]
    assert math.isnan(fidelity([], "es", ident))
    assert fidelity(["", "  \n", "hola"], "es", ident) == pytest.approx(1 / 3)  # an empty answer is in no language
    assert mean_length(["ab", "abcd"]) == 3.0


def test_fidelity_with_lingua():
    from icr.languages import language_identifier

    ident = language_identifier(("es", "de"))
    outs = ["El gato duerme en la casa porque hace mucho frío afuera.",
            "The cat sleeps in the house because it is very cold outside.",
            "Die Katze schläft im Haus, weil es draußen sehr kalt ist."]
    assert fidelity(outs, "es", ident) == pytest.approx(1 / 3)


def _stand_in_gamed(path, n, rng):
    """A local stand-in for alpaca_eval's df_gamed.csv (per-instruction difficulty and the annotations of
    its two length-gamed baselines), with the columns alpaca_eval reads."""
    import pandas as pd

    difficulty = rng.normal(0, 1, n)
    rows = []
    for model, sign in (("gamed_verbose", 1.0), ("gamed_concise", -1.0)):
        delta = sign * np.abs(rng.normal(1.0, 0.5, n))
        pref = 1 / (1 + np.exp(-(difficulty + 0.8 * np.tanh(delta))))
        rows.append(pd.DataFrame({"model": model, "index": range(n), "preference": pref,
                                  "std_delta_len": delta, "instruction_difficulty": difficulty,
                                  "not_gamed_baseline": False}))
    pd.concat(rows).to_csv(path, index=False)


def test_alpaca_eval_lc_through_icr_equals_the_library(tmp_path, monkeypatch):
    """icr's `lc_method: alpaca_eval` is alpaca_eval's length_controlled_v1 on the same annotations,
    fed the per-instruction data from a local folder (here a stand-in file: the hub is unreachable)."""
    try:
        import pandas as pd
        from alpaca_eval.metrics import glm_winrate
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"alpaca_eval not importable ({type(e).__name__}: {e}); the eval extra installs it")
    from icr.errors import IcrError
    from icr.evaluation.metrics import alpaca_eval_length_controlled_win_rate

    rng = np.random.default_rng(5)
    n = 120
    _stand_in_gamed(tmp_path / "df_gamed.csv", n, rng)
    ref = rng.integers(200, 3000, n)
    out = rng.integers(100, 4000, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-np.tanh((out - ref) / 1000)))).astype(float)
    y[rng.random(n) < 0.1] = 0.5
    outputs, refs = ["o" * int(v) for v in out], ["r" * int(v) for v in ref]
    ours = alpaca_eval_length_controlled_win_rate(y, outputs, refs, range(1, n + 1), data_dir=str(tmp_path))

    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kw: str(tmp_path / kw["filename"]))
    df = pd.DataFrame({"preference": y + 1, "output_1": refs, "output_2": outputs, "generator_1": "gpt4_turbo",
                       "generator_2": "m", "annotator": "weighted_alpaca_eval_gpt4_turbo"})
    theirs = glm_winrate.get_length_controlled_winrate(df, save_weights_dir=None)["length_controlled_winrate"]
    assert ours == pytest.approx(theirs, abs=0.1)
    assert abs(ours - length_controlled_win_rate(y, out, ref)) > 0.1  # the instruction term does matter here
    monkeypatch.undo()
    with pytest.raises(IcrError, match="df_gamed.csv not found"):
        alpaca_eval_length_controlled_win_rate(y, outputs, refs, range(1, n + 1), data_dir=str(tmp_path / "nowhere"))


def test_evaluation_rows_say_which_lc(tmp_path):
    from icr.config import EvaluationConfig
    from icr.evaluation.evaluate import evaluate_model
    from icr.evaluation.judges import FakeJudge
    from icr.evaluation.results import validate_results

    from .test_report import PROMPTS, REFS, EchoBackend, Ident

    rows = evaluate_model("m", "M0", 0, PROMPTS, REFS, FakeJudge("hash"), EvaluationConfig(), tmp_path,
                          backend=EchoBackend(), identifier=Ident())
    assert {r["lc_method"] for r in rows} == {"icr:minimal"}
    validate_results(rows)
    old = [{k: v for k, v in r.items() if k != "lc_method"} for r in rows]  # results.json before the field
    validate_results(old)
    try:
        import alpaca_eval.metrics  # noqa: F401
    except Exception:  # noqa: BLE001
        with pytest.raises(Exception, match="alpaca-eval package"):
            evaluate_model("m", "M0", 0, PROMPTS, REFS, FakeJudge("hash"), EvaluationConfig(lc_method="alpaca_eval"),
                           tmp_path / "b", backend=EchoBackend(), identifier=Ident())
        return
    rng = np.random.default_rng(0)
    (tmp_path / "gamed").mkdir()
    _stand_in_gamed(tmp_path / "gamed" / "df_gamed.csv", 2, rng)
    rows = evaluate_model("m", "M0", 0, PROMPTS, REFS, FakeJudge("hash"),
                          EvaluationConfig(lc_method="alpaca_eval", lc_data_dir=str(tmp_path / "gamed")),
                          tmp_path / "b", backend=EchoBackend(), identifier=Ident())
    assert {r["lc_method"] for r in rows} == {"alpaca_eval:length_controlled_v1"}
