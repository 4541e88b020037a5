"""Evaluation metrics: win rate, length-controlled win rate, language fidelity, mean length.

Preferences are floats in [0, 1]: the judge's preference for the model's answer over the
reference answer (1 = model wins, 0 = reference wins, 0.5 = tie; weighted judges give fractions).
Rates are returned in percent, like AlpacaEval reports them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Ridge strength of the length-controlled GLM (on the summed, not averaged, log-likelihood). It only
# keeps the fit finite when the data are separable (for example every answer wins): with 805
# prompts it moves a non-degenerate fit by far less than 0.01 points. See `length_controlled_win_rate`.
LC_RIDGE = 1e-3


def _prefs(prefs) -> np.ndarray:
    p = np.asarray(list(prefs), dtype=float)
    if p.ndim != 1:
        raise ValueError("preferences must be a flat sequence")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("preferences must lie in [0, 1] (1 = model wins, 0.5 = tie), without NaN")
    return p


def win_rate(prefs) -> tuple[float, float]:
    """Mean preference for the model (ties count 0.5), and its standard error, both in percent.

    The standard error is the sample standard deviation (ddof=1) over sqrt(n), as in alpaca_eval's
    `get_winrate` (pandas `sem`). With a single judgement it is undefined: NaN.
    """
    p = _prefs(prefs)
    if len(p) == 0:
        raise ValueError("win_rate of no preferences")
    se = float(p.std(ddof=1) / math.sqrt(len(p))) if len(p) > 1 else math.nan
    return float(p.mean() * 100), se * 100


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _fit_logistic(X: np.ndarray, y: np.ndarray, ridge: float, max_iter: int = 100) -> np.ndarray:
    """Maximise sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - ridge/2 |w|^2, p = sigmoid(X w).

    Newton's method (IRLS) with step halving, so every step increases the objective. Soft targets
    y_i in [0, 1] enter the likelihood directly: this is the same objective as alpaca_eval's trick of
    duplicating each row with label 1 (weight y) and label 0 (weight 1 - y).
    """
    def objective(w):
        z = X @ w
        # log sigmoid(z) = -log(1 + e^-z), written stably with logaddexp.
        return float(-(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)).sum() - ridge / 2 * w @ w)

    w = np.zeros(X.shape[1])
    current = objective(w)
    for _ in range(max_iter):
        p = _sigmoid(X @ w)
        grad = X.T @ (y - p) - ridge * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            candidate = w + t * step
            value = objective(candidate)
            if value >= current:
                break
            t /= 2
            if t < 1e-10:  # no ascent left: w is the optimum to numerical precision
                return w
        w, previous, current = candidate, current, value
        if np.abs(t * step).max() < 1e-10 or current - previous < 1e-12:
            break
    return w


def length_controlled_win_rate(prefs, output_lengths, reference_lengths) -> float:
    """Length-controlled win rate in percent: the win rate the judge would give at equal lengths.

    This is AlpacaEval 2's length-controlled GLM (Dubois et al. 2024) reduced to the terms that can
    be computed for any language offline:

        P(model wins) = sigmoid(b + w * tanh(delta / sd(delta))),   delta = len(output) - len(reference)

    with lengths in characters and sd the sample standard deviation (ddof=1) of delta, not
    centred, exactly as alpaca_eval standardises it. `b` plays the role of alpaca_eval's
    `not_gamed_baseline` column (a per-model intercept); LC = 100 * sigmoid(b), the prediction at
    delta = 0 (alpaca_eval averages that prediction over the rows, which here are all equal).

    Left out on purpose: alpaca_eval's `instruction_difficulty` term. It is a per-instruction
    table fitted on English AlpacaEval annotations, downloaded from the hub and indexed by row
    position 0..804, so it neither exists for other languages nor offline. The fit therefore
    matches alpaca_eval's `glm_name="length_controlled_minimal"`, not its default
    `length_controlled_v1`. Also different: alpaca_eval picks an L1 penalty by 5-fold
    cross-validation (liblinear); here the fit is maximum likelihood with a tiny ridge (`LC_RIDGE`),
    which only matters when the data are separable (all wins / all losses). The tests measure the
    difference to alpaca_eval's own function where it is installed.

    When the judge decides by length alone (every longer answer wins), the data are separable and
    the intercept is not identified: LC is then an artefact of the ridge, with few prompts far
    from 50 (alpaca_eval has the same limitation). Soft preferences are used as soft targets. When all length differences are equal (sd = 0 or
    one row) the length term is dropped and LC is the (ridge-shrunk) win rate.
    """
    y = _prefs(prefs)
    out_len = np.asarray(list(output_lengths), dtype=float)
    ref_len = np.asarray(list(reference_lengths), dtype=float)
    if not (len(y) == len(out_len) == len(ref_len)):
        raise ValueError(f"lengths differ: {len(y)} preferences, {len(out_len)} outputs, "
                         f"{len(ref_len)} references")
    if len(y) == 0:
        raise ValueError("length_controlled_win_rate of no preferences")
    delta = out_len - ref_len
    sd = float(delta.std(ddof=1)) if len(delta) > 1 else 0.0
    columns = [np.ones_like(y)]
    if sd > 0:
        columns.append(np.tanh(delta / sd))
    w = _fit_logistic(np.stack(columns, axis=1), y, LC_RIDGE)
    return float(_sigmoid(w[0]) * 100)


def fidelity(outputs: Sequence[str], lang: str, identifier) -> float:
    """Share (0..1) of outputs identified as language `lang`.

    `identifier` is an `icr.languages.LanguageIdentifier` (or anything with `identify_many`).
    As in `LanguageIdentifier.is_in`, a text without any letter (a number, code punctuation)
    counts as in-language: there is nothing to identify; an empty (or blank) answer does not: it is
    in no language. NaN for no outputs.
    """
    outputs = list(outputs)
    if not outputs:
        return math.nan
    has_letters = [any(ch.isalpha() for ch in text) for text in outputs]
    to_identify = [text for text, letters in zip(outputs, has_letters) if letters]
    identified = iter(identifier.identify_many(to_identify) if to_identify else [])
    hits = sum(int(next(identified) == lang) if letters else int(bool(text.strip()))
               for text, letters in zip(outputs, has_letters))
    return hits / len(outputs)


def mean_length(outputs: Sequence[str]) -> float:
    """Mean answer length in characters (the unit of AlpacaEval's length control)."""
    outputs = list(outputs)
    return float(np.mean([len(t) for t in outputs])) if outputs else math.nan


def alpaca_eval_length_controlled_win_rate(prefs, outputs: Sequence[str], references: Sequence[str],
                                           ids: Sequence, data_dir: str | None = None) -> float:
    """AlpacaEval 2's length-controlled win rate, computed by alpaca_eval itself, in percent.

    `alpaca_eval.metrics.get_length_controlled_winrate` with `length_controlled_v1` (the paper's and
    the leaderboard's LC): the GLM with the per-instruction difficulty and the regularisation toward
    alpaca_eval's gamed baselines. alpaca_eval finds an answer's difficulty by its `index`, the row of
    its instruction among AlpacaEval's 805; `ids[i]` is item i's prompt id, and X-AlpacaEval's id k
    (1..805, AlpacaEval's order) is row k - 1 (`alpaca_eval_rows`), so a reordered or filtered
    evaluation set still lines up, and an id alpaca_eval's data does not know is an error, not a
    silent mismatch. alpaca_eval reads its per-instruction data (`df_gamed.csv`) from the hub;
    `data_dir` names a local folder holding that file instead (machines without network), handed to
    alpaca_eval in place of its download (the one line of alpaca_eval this touches:
    `glm_winrate.hf_hub_download`).
    """
    from unittest import mock

    try:
        import pandas as pd
        from alpaca_eval.metrics import glm_winrate
    except Exception as e:  # noqa: BLE001 - ImportError, or pkg_resources missing under new setuptools
        from ..errors import IcrError

        raise IcrError("evaluation.lc_method alpaca_eval needs the alpaca-eval package (pip install 'icr[eval]'); "
                       f"import failed: {type(e).__name__}: {e}") from None
    p = _prefs(prefs)
    gamed = _df_gamed_path(glm_winrate, data_dir)
    annotations = pd.DataFrame({
        "index": alpaca_eval_rows(ids, gamed), "output_1": list(references), "output_2": list(outputs),
        "generator_1": "reference", "generator_2": "model", "annotator": "icr",
        "preference": 1.0 + p,  # alpaca_eval: 1 = output_1 (the reference) wins, 2 = output_2 (the model)
    })
    with mock.patch.object(glm_winrate, "hf_hub_download", lambda **_: gamed):  # the file checked above
        metrics = glm_winrate.get_length_controlled_winrate(
            annotations, glm_name="length_controlled_v1", save_weights_dir=None,
            is_add_glm_preference_inplace=False, is_warn_extreme_changes=False)
    return float(metrics["length_controlled_winrate"])


def _df_gamed_path(glm_winrate, data_dir: str | None) -> str:
    """alpaca_eval's per-instruction data: `data_dir`/df_gamed.csv, or the hub file alpaca_eval
    itself downloads (same call as its `_get_featurized_data`)."""
    from pathlib import Path

    if data_dir is None:
        from alpaca_eval import constants

        return glm_winrate.hf_hub_download(
            repo_id="tatsu-lab/alpaca_eval", filename="df_gamed.csv", repo_type="dataset",
            token=constants.DATASETS_TOKEN, force_download=constants.DATASETS_FORCE_DOWNLOAD,
            cache_dir=constants.DEFAULT_CACHE_DIR)
    path = Path(data_dir) / "df_gamed.csv"
    if not path.is_file():
        from ..errors import IcrError

        raise IcrError(f"evaluation.lc_data_dir: {path} not found (alpaca_eval's df_gamed.csv)")
    return str(path)


LC_DATA = {"repo_id": "tatsu-lab/alpaca_eval", "filename": "df_gamed.csv", "repo_type": "dataset"}


def check_lc_data(data_dir: str | None, ids_by_lang: dict[str, Sequence]) -> str:
    """Preflight of `lc_method: alpaca_eval` (icr validate, icr run): alpaca_eval imports, its
    per-instruction data (`df_gamed.csv`) is at hand, and every evaluation prompt id of a language
    with references is one of its rows; returns the file's path. Otherwise alpaca_eval only fails
    once every answer has been judged: offline with a raw huggingface_hub error from the download in
    `glm_winrate._get_featurized_data`, or on an id it does not know.

    The file is `data_dir`/df_gamed.csv (evaluation.lc_data_dir), else the copy in the hub cache
    (alpaca_eval's cache_dir, constants.DEFAULT_CACHE_DIR; huggingface_hub's default when None),
    else it is downloaded now (the same call alpaca_eval makes) unless the hub is offline."""
    from ..errors import IcrError

    try:
        from alpaca_eval.metrics import glm_winrate
    except Exception as e:  # noqa: BLE001 - ImportError, or pkg_resources missing under new setuptools
        raise IcrError("evaluation.lc_method alpaca_eval needs the alpaca-eval package (pip install 'icr[eval]'); "
                       f"import failed: {type(e).__name__}: {e}") from None
    if data_dir is not None:
        gamed = _df_gamed_path(glm_winrate, data_dir)
    else:
        from alpaca_eval import constants
        from huggingface_hub import constants as hub
        from huggingface_hub import try_to_load_from_cache

        how = ("download it where there is network (hf download tatsu-lab/alpaca_eval df_gamed.csv --repo-type "
               "dataset --local-dir DIR) and set evaluation.lc_data_dir: DIR, or set evaluation.lc_method: minimal")
        cached = try_to_load_from_cache(**LC_DATA, cache_dir=constants.DEFAULT_CACHE_DIR)
        if isinstance(cached, str) and not constants.DATASETS_FORCE_DOWNLOAD:
            gamed = cached
        elif hub.HF_HUB_OFFLINE:
            raise IcrError("evaluation.lc_data_dir: not set, and alpaca_eval's length-control data (df_gamed.csv of "
                           "the hub dataset tatsu-lab/alpaca_eval) is not in the hub cache while the hub is offline "
                           f"(HF_HUB_OFFLINE=1); {how}")
        else:
            try:
                gamed = _df_gamed_path(glm_winrate, None)
            except Exception as e:  # noqa: BLE001 - hub errors come in many classes; one line for all
                first = (str(e).splitlines() or [""])[0][:200]
                raise IcrError("evaluation.lc_data_dir: not set, and alpaca_eval's length-control data (df_gamed.csv "
                               f"of the hub dataset tatsu-lab/alpaca_eval) cannot be downloaded ({type(e).__name__}: "
                               f"{first}); {how}") from None
    for ids in ids_by_lang.values():
        try:
            alpaca_eval_rows(list(ids), gamed)
        except (ValueError, KeyError, OSError) as e:  # not a CSV with an `index` column
            raise IcrError(f"evaluation.lc_data_dir: {gamed}: not alpaca_eval's df_gamed.csv ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:200]})") from None
    return gamed


def alpaca_eval_rows(ids: Sequence, df_gamed: str) -> list[int]:
    """The AlpacaEval row of each prompt id: X-AlpacaEval's id k (1..805, in AlpacaEval's order:
    the authors' data/x-alpacaeval/data/*.json) is alpaca_eval's `index` k - 1. An id that is not a
    whole number, or whose row alpaca_eval's per-instruction data (`df_gamed`, a path) lacks, is an
    IcrError naming it."""
    import pandas as pd

    known = set(pd.read_csv(df_gamed, usecols=["index"])["index"].astype(int))
    rows = []
    for pid in ids:
        text = str(pid).strip()
        row = int(text) - 1 if text.isdigit() and not isinstance(pid, (bool, float)) else None
        if row is None or row not in known:
            from ..errors import IcrError

            raise IcrError(f"evaluation.lc_method alpaca_eval: prompt id {pid!r} is not one of AlpacaEval's "
                           f"instruction ids 1..{max(known, default=-1) + 1} that alpaca_eval's per-instruction data "
                           "knows (X-AlpacaEval's ids); use lc_method: minimal for another evaluation set")
        rows.append(row)
    return rows
