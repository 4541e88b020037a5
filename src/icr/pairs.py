"""From scored samples to preference pairs: best vs worst per prompt, with the paper's length control.

The alpha search is written here (no library has it): per language, alpha on the grid
0, step, ..., alpha_max is the one that makes chosen and rejected equally long on average, where
chosen = argmax and rejected = argmin of r - alpha*len(y). It is vectorised over prompts,
candidates and blocks of alphas; tests/test_pairs.py checks it against the rule written out
literally. Ties (in the argmax/argmin and between alphas) go to the first index / smallest alpha.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np

from .config import PairsConfig


def _pad(groups: list[list[float]], fill: float) -> np.ndarray:
    width = max(len(g) for g in groups)
    out = np.full((len(groups), width), fill, dtype=np.float64)
    for i, g in enumerate(groups):
        out[i, : len(g)] = g
    return out


def alpha_search(rewards: list[list[float]], lengths: list[list[float]], alphas: np.ndarray,
                 block: int = 128) -> tuple[float, np.ndarray]:
    """Return (best alpha, |mean length difference| per alpha) for one language's prompts."""
    r = _pad(rewards, 0.0)
    ln = _pad(lengths, 0.0)
    valid = _pad([[1.0] * len(g) for g in rewards], 0.0).astype(bool)
    rows = np.arange(len(r))
    gaps = np.empty(len(alphas))
    for start in range(0, len(alphas), block):
        a = alphas[start:start + block, None, None]
        adjusted = r[None] - a * ln[None]  # (A, P, K)
        best = np.where(valid[None], adjusted, -np.inf).argmax(axis=2)
        worst = np.where(valid[None], adjusted, np.inf).argmin(axis=2)
        diff = ln[rows[None], best] - ln[rows[None], worst]  # (A, P)
        gaps[start:start + block] = np.abs(diff.mean(axis=1))
    return float(alphas[int(np.argmin(gaps))]), gaps


def alpha_grid(cfg: PairsConfig) -> np.ndarray:
    steps = int(round(cfg.alpha_max / cfg.alpha_step))
    return np.round(np.arange(steps + 1) * cfg.alpha_step, 10)


def _normalise(records: list[dict], how: str) -> dict[int, float]:
    """Ranking score per record index: raw r, r per token, or r standardised within a language."""
    if how == "per_token":
        return {i: r["reward"] / max(1, r["n_tokens"]) for i, r in enumerate(records)}
    scores = {i: r["reward"] for i, r in enumerate(records)}
    if how == "per_language":
        by_lang = defaultdict(list)
        for i, r in enumerate(records):
            by_lang[r["lang"]].append(i)
        for idx in by_lang.values():
            vals = np.array([scores[i] for i in idx])
            mu, sd = vals.mean(), vals.std() or 1.0
            for i in idx:
                scores[i] = (scores[i] - mu) / sd
    return scores


def select_pairs(scored: list[dict], cfg: PairsConfig, *, seed: int = 42, in_language=None,
                 judge_scores: dict[tuple, float] | None = None) -> tuple[list[dict], dict]:
    """Pick one (chosen, rejected) pair per prompt; return (pairs, stats per language).

    `scored`: records with id, lang, prompt, sample, response, finished, n_tokens, reward.
    `in_language(text, lang) -> bool` is the language test of the language filter and of the fidelity
    figures (None: no filter, and candidate_fidelity / chosen_fidelity are None).
    `judge_scores[(id, lang, sample)]` is needed for `selection: judge` (the oracle control).
    `cfg.max_chosen_reward` must be one number or None: a per-iteration mapping is resolved first
    (`cfg.at_iteration(t)`, as `icr.stages.run_pairs` does).
    """
    if isinstance(cfg.max_chosen_reward, dict):
        raise ValueError("select_pairs: pairs.max_chosen_reward is a per-iteration mapping; pass "
                         "cfg.at_iteration(t) (the bound of the iteration being built)")
    scores = _normalise(scored, cfg.normalize)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, rec in enumerate(scored):
        groups[(rec["lang"], rec["id"])].append(i)
    length_of = _length_function(scored, cfg)

    stats: dict[str, dict] = {}
    pairs: list[dict] = []
    for lang in sorted({k[0] for k in groups}):
        keys = [k for k in groups if k[0] == lang]
        st = {"n_prompts": len(keys), "n_candidates": 0, "candidates_in_language": 0, "dropped_filters": 0,
              "dropped_no_pair": 0, "dropped_margin": 0, "dropped_nonfinite": 0}
        kept_keys, cand_idx = _filter_candidates(lang, keys, groups, scored, scores, cfg, in_language, st)
        alpha = _length_control_alpha(cand_idx, scores, length_of, cfg, st)
        pairs += _language_pairs(lang, kept_keys, cand_idx, scored, scores, length_of, alpha, cfg, seed,
                                 judge_scores, in_language, st)
        stats[lang] = st
    return pairs, {"per_language": stats, "max_chosen_reward": cfg.max_chosen_reward}


def _filter_candidates(lang, keys, groups, scored, scores, cfg: PairsConfig, in_language, st):
    """(prompts with >= 2 candidates left, their candidates) after the non-finite, language and
    truncation filters; what was dropped is counted in `st`."""
    kept_keys, cand_idx = [], []
    for key in keys:
        idx = groups[key]
        st["n_candidates"] += len(idx)
        finite = [i for i in idx if np.isfinite(scores[i])]
        st["dropped_nonfinite"] += len(idx) - len(finite)
        keep = []
        for i in finite:
            rec = scored[i]
            ok_lang = in_language is None or in_language(rec["response"], lang)
            if in_language is not None:
                st["candidates_in_language"] += bool(ok_lang)
            if (cfg.language_filter and not ok_lang) or (cfg.drop_truncated and not rec["finished"]):
                continue
            keep.append(i)
        if len(keep) < 2:
            st["dropped_filters"] += 1
            continue
        kept_keys.append(key)
        cand_idx.append(keep)
    return kept_keys, cand_idx


def _length_function(scored: list[dict], cfg: PairsConfig):
    """len(y) of record i for the length control: tokens, characters of the stripped text, or characters."""
    if cfg.length_unit == "tokens":
        return lambda i: scored[i]["n_tokens"]
    if cfg.length_strip:
        return lambda i: len(scored[i]["response"].strip())
    return lambda i: len(scored[i]["response"])


def adjusted_scores(records: list[dict], alphas: dict[str, float], cfg: PairsConfig) -> list[float]:
    """Each record's length-adjusted score as `select_pairs` ranks a language's candidates: the
    (normalised) reward minus alpha_lang * len(y), with `alphas` the chosen alpha per language (for
    views of the pairs, e.g. report.html's pair browser)."""
    scores, length_of = _normalise(records, cfg.normalize), _length_function(records, cfg)
    return [scores[i] - alphas.get(r["lang"], 0.0) * length_of(i) for i, r in enumerate(records)]


def _length_control_alpha(cand_idx, scores, length_of, cfg: PairsConfig, st) -> float:
    """One language's alpha (0.0 without length control), recorded in `st` with its search curve."""
    alpha, curve = 0.0, None
    if cfg.selection == "reward" and cfg.length_control and cand_idx:
        grid = alpha_grid(cfg)
        alpha, gaps = alpha_search([[scores[i] for i in c] for c in cand_idx],
                                   [[length_of(i) for i in c] for c in cand_idx], grid)
        stride = max(1, len(grid) // 100)
        curve = [[float(grid[j]), float(gaps[j])] for j in range(0, len(grid), stride)]
    st["alpha"] = alpha
    if curve:
        st["alpha_curve"] = curve
    return alpha


def _language_pairs(lang, kept_keys, cand_idx, scored, scores, length_of, alpha, cfg: PairsConfig, seed,
                    judge_scores, in_language, st) -> list[dict]:
    """One language's pairs (one per prompt that has one); the pair counts and lengths go to `st`."""
    pairs = []
    chosen_len, rejected_len, chosen_in_lang = [], [], []
    for key, cands in zip(kept_keys, cand_idx):
        pair = _pick(key, cands, scored, scores, length_of, alpha, cfg, seed, judge_scores)
        if pair is None:
            st["dropped_no_pair"] += 1
            continue
        c, w, margin = pair
        if cfg.min_margin is not None and margin < cfg.min_margin:
            st["dropped_margin"] += 1
            continue
        chosen_len.append(len(scored[c]["response"]))
        rejected_len.append(len(scored[w]["response"]))
        if in_language is not None:
            chosen_in_lang.append(in_language(scored[c]["response"], lang))
        pairs.append({
            "id": key[1], "lang": lang, "prompt": scored[c]["prompt"],
            "chosen": scored[c]["response"], "rejected": scored[w]["response"],
            "chosen_reward": scored[c]["reward"], "rejected_reward": scored[w]["reward"],
            "chosen_sample": scored[c]["sample"], "rejected_sample": scored[w]["sample"],
            "alpha": alpha,
        })
    st["n_pairs"] = len(chosen_len)
    st["chosen_len_mean"] = float(np.mean(chosen_len)) if chosen_len else None
    st["rejected_len_mean"] = float(np.mean(rejected_len)) if rejected_len else None
    st["chosen_fidelity"] = float(np.mean(chosen_in_lang)) if chosen_in_lang else None
    if in_language is None:  # no language test: the fidelity is not known, not 1
        st["candidates_in_language"] = st["candidate_fidelity"] = None
    else:
        st["candidate_fidelity"] = st["candidates_in_language"] / max(1, st["n_candidates"] - st["dropped_nonfinite"])
    return pairs


def _pick(key, cands, scored, scores, length_of, alpha, cfg: PairsConfig, seed, judge_scores):
    """(chosen, rejected, margin) for one prompt, or None when the candidates cannot be told apart."""
    if cfg.selection == "random":
        rng = random.Random(f"{seed}:{key[0]}:{key[1]}")
        distinct = {}
        for i in cands:
            distinct.setdefault(scored[i]["response"], i)
        if len(distinct) < 2:
            return None
        c, w = rng.sample(sorted(distinct.values()), 2)
        return c, w, 0.0
    if cfg.selection == "judge":
        vals = np.array([judge_scores[(scored[i]["id"], scored[i]["lang"], scored[i]["sample"])] for i in cands])
    else:
        vals = np.array([scores[i] - alpha * length_of(i) for i in cands])
    allowed = vals.copy()
    if cfg.max_chosen_reward is not None and cfg.selection == "reward":
        if cfg.max_chosen_reward_on == "adjusted":  # the authors': score < upper_bound (strict)
            allowed = np.where(vals < cfg.max_chosen_reward, vals, -np.inf)
        else:
            raw = np.array([scores[i] for i in cands])
            allowed = np.where(raw > cfg.max_chosen_reward, -np.inf, vals)
    if not np.isfinite(allowed).any():
        return None
    c, w = int(np.argmax(allowed)), int(np.argmin(vals))
    if cfg.keep_ties:  # the authors' rule: best and worst even when they are the same answer
        return cands[c], cands[w], float(vals[c] - vals[w])
    # Identical texts can differ in score by float noise (different padding in a batch): never a pair.
    if vals[c] <= vals[w] or scored[cands[c]]["response"] == scored[cands[w]]["response"]:
        return None
    return cands[c], cands[w], float(vals[c] - vals[w])


def llamafactory_dataset_info(dataset_name: str, file_name: str = "pairs.jsonl") -> dict:
    """`dataset_info.json` entry so LLaMA-Factory reads pairs.jsonl as a ranking (DPO) dataset."""
    return {dataset_name: {"file_name": file_name, "ranking": True,
                           "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}}}
