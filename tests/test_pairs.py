import json

import numpy as np
import pytest

from icr.config import PairsConfig
from icr.pairs import alpha_grid, alpha_search, llamafactory_dataset_info, select_pairs


def alpha_search_bruteforce(rewards, lengths, alphas) -> float:
    """The rule, literally: for each alpha, each prompt, pick argmax/argmin; keep the smallest gap."""
    best_alpha, best_gap = None, None
    for alpha in alphas:
        diffs = []
        for r, ln in zip(rewards, lengths):
            adj = [ri - alpha * li for ri, li in zip(r, ln)]
            c = max(range(len(adj)), key=lambda j: (adj[j], -j))
            w = min(range(len(adj)), key=lambda j: (adj[j], j))
            diffs.append(ln[c] - ln[w])
        gap = abs(sum(diffs) / len(diffs))
        if best_gap is None or gap < best_gap:
            best_alpha, best_gap = float(alpha), gap
    return best_alpha


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_alpha_search_equals_bruteforce(seed):
    rng = np.random.default_rng(seed)
    n_prompts = 30
    rewards = [list(rng.normal(0, 20, size=rng.integers(2, 11))) for _ in range(n_prompts)]
    lengths = [list(rng.integers(1, 400, size=len(r)).astype(float)) for r in rewards]
    # Make long answers score higher, as DPO models do, so alpha matters.
    rewards = [[r + 0.05 * ln for r, ln in zip(rs, ls)] for rs, ls in zip(rewards, lengths)]
    grid = alpha_grid(PairsConfig(alpha_step=0.01, alpha_max=0.99))
    ours, gaps = alpha_search(rewards, lengths, grid, block=7)
    assert ours == alpha_search_bruteforce(rewards, lengths, grid)
    assert gaps.shape == grid.shape


def test_paper_grid():
    grid = alpha_grid(PairsConfig())
    assert len(grid) == 1000 and grid[0] == 0.0 and grid[1] == 0.001 and grid[-1] == 0.999


def _rec(pid, lang, k, response, reward, finished=True):
    return {"id": pid, "lang": lang, "prompt": f"q{pid}", "sample": k, "response": response, "finished": finished,
            "n_tokens": len(response.split()) + 1, "reward": reward}


def test_best_and_worst_without_length_control():
    recs = [_rec("a", "es", 0, "uno", 1.0), _rec("a", "es", 1, "dos dos", 3.0), _rec("a", "es", 2, "tres", -2.0)]
    pairs, stats = select_pairs(recs, PairsConfig(length_control=False, language_filter=False))
    assert len(pairs) == 1
    p = pairs[0]
    assert (p["chosen"], p["rejected"], p["chosen_reward"], p["rejected_reward"]) == ("dos dos", "tres", 3.0, -2.0)
    assert stats["per_language"]["es"]["n_pairs"] == 1 and p["alpha"] == 0.0


def test_all_equal_scores_give_no_pair_and_are_counted():
    recs = [_rec("a", "es", k, "same", 0.5) for k in range(3)] + [_rec("b", "es", 0, "x", 1.0), _rec("b", "es", 1, "y", 0.0)]
    pairs, stats = select_pairs(recs, PairsConfig(length_control=False, language_filter=False))
    assert [p["id"] for p in pairs] == ["b"]
    assert stats["per_language"]["es"]["dropped_no_pair"] == 1


def test_length_control_balances_lengths():
    rng = np.random.default_rng(0)
    recs = []
    for i in range(40):
        for k in range(6):
            n = int(rng.integers(1, 60))
            recs.append(_rec(str(i), "de", k, "w" * n, 0.2 * n + float(rng.normal(0, 1))))
    no_lc, _ = select_pairs(recs, PairsConfig(length_control=False, language_filter=False))
    lc, stats = select_pairs(recs, PairsConfig(length_control=True, language_filter=False))
    gap = lambda ps: abs(np.mean([len(p["chosen"]) - len(p["rejected"]) for p in ps]))
    assert gap(lc) < gap(no_lc) / 5
    assert stats["per_language"]["de"]["alpha"] > 0 and lc[0]["alpha"] == stats["per_language"]["de"]["alpha"]


def test_filters_and_options():
    recs = [_rec("a", "es", 0, "hola amigo", 2.0), _rec("a", "es", 1, "hello friend", 9.0),
            _rec("a", "es", 2, "adios", -1.0, finished=False), _rec("a", "es", 3, "buenas", 0.0)]
    in_lang = lambda text, lang: not text.startswith("hello")
    pairs, stats = select_pairs(recs, PairsConfig(length_control=False, language_filter=True), in_language=in_lang)
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("hola amigo", "adios")
    assert stats["per_language"]["es"]["candidate_fidelity"] == 0.75
    pairs, _ = select_pairs(recs, PairsConfig(length_control=False, language_filter=True, drop_truncated=True),
                            in_language=in_lang)
    assert pairs[0]["rejected"] == "buenas"
    pairs, st = select_pairs(recs, PairsConfig(length_control=False, language_filter=False, min_margin=20.0))
    assert pairs == [] and st["per_language"]["es"]["dropped_margin"] == 1
    pairs, _ = select_pairs(recs, PairsConfig(length_control=False, language_filter=False, max_chosen_reward=5.0))
    assert pairs[0]["chosen"] == "hola amigo"
    pairs, _ = select_pairs(recs, PairsConfig(length_control=False, language_filter=False, normalize="per_token"))
    assert pairs[0]["chosen"] == "hello friend"


def test_nan_rewards_are_excluded_and_counted():
    recs = [_rec("a", "es", 0, "x", float("nan")), _rec("a", "es", 1, "y", 1.0), _rec("a", "es", 2, "z", 0.0)]
    pairs, stats = select_pairs(recs, PairsConfig(length_control=False, language_filter=False))
    assert pairs[0]["chosen"] == "y" and stats["per_language"]["es"]["dropped_nonfinite"] == 1


def test_random_and_judge_selection_controls():
    recs = [_rec("a", "es", k, f"r{k}", float(k)) for k in range(5)]
    pairs, _ = select_pairs(recs, PairsConfig(selection="random", language_filter=False), seed=1)
    again, _ = select_pairs(recs, PairsConfig(selection="random", language_filter=False), seed=1)
    assert pairs == again and pairs[0]["chosen"] != pairs[0]["rejected"]
    judge = {("a", "es", k): float(-k) for k in range(5)}
    pairs, _ = select_pairs(recs, PairsConfig(selection="judge", language_filter=False), judge_scores=judge)
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("r0", "r4")


def test_pairs_load_with_datasets_and_llamafactory_info(tmp_path):
    import datasets

    from icr.runs import write_jsonl

    recs = [_rec(str(i), "es", k, "w" * (k + 1), float(k)) for i in range(3) for k in range(3)]
    pairs, _ = select_pairs(recs, PairsConfig(language_filter=False))
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "pairs.jsonl"), split="train")
    assert set(["id", "lang", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "alpha"]) <= set(ds.column_names)
    info = llamafactory_dataset_info("icr_x")
    assert info["icr_x"]["ranking"] is True and json.dumps(info)


# --- the authors' pair rule (ZNLP/Implicit-Cross-Lingual-Rewarding, utils/generate_preference_pair.py) ------------

def _authors_pairs(rewards, responses, upper_bound=float("inf")):
    """Their add_lc_score / optimize_alpha / generate_lc_dpo_pair (lines 40-109), transcribed; lengths as
    load_response_length (line 27) of responses already stripped by their sampler (inference.py:144)."""
    lengths = [[len(r.strip()) for r in rs] for rs in responses]
    best_alpha, min_avg_diff = 0.0, float("inf")
    for alpha in np.arange(0.0, 1.0, 0.001):
        adj = [[s - alpha * ln for s, ln in zip(ss, ls)] for ss, ls in zip(rewards, lengths)]
        ch = [np.argmax(a) for a in adj]
        rj = [np.argmin(a) for a in adj]
        avg = np.mean([ls[c] - ls[r] for c, r, ls in zip(ch, rj, lengths)])
        if abs(avg) < abs(min_avg_diff):
            min_avg_diff, best_alpha = avg, alpha
    adj = [[s - best_alpha * ln for s, ln in zip(ss, ls)] for ss, ls in zip(rewards, lengths)]
    chosen = [int(np.argmax([s if s < upper_bound else -float("inf") for s in a])) for a in adj]
    reject = [int(np.argmin(a)) for a in adj]
    return best_alpha, chosen, reject


PAPER_PAIRS = dict(language_filter=False, keep_ties=True, length_strip=True, max_chosen_reward_on="adjusted")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_options_reproduce_the_authors_pairs(seed):
    rng = np.random.default_rng(seed)
    recs, rewards, responses = [], [], []
    for i in range(30):
        rs, ts = [], []
        for k in range(6):
            n = int(rng.integers(1, 50))
            text = " " * int(rng.integers(0, 3)) + "w" * n + "\n" * int(rng.integers(0, 3))
            r = round(0.3 * n + float(rng.normal(0, 3)), 1)
            if i % 7 == 0:  # every sample identical: the authors still make a (degenerate) pair
                text, r = "same", 1.0
            rs.append(r)
            ts.append(text)
            recs.append(_rec(str(i), "es", k, text, r))
        rewards.append(rs)
        responses.append(ts)
    bound = 8.0
    alpha, chosen, reject = _authors_pairs(rewards, responses, upper_bound=bound)
    pairs, stats = select_pairs(recs, PairsConfig(**PAPER_PAIRS, max_chosen_reward=bound))
    assert stats["per_language"]["es"]["alpha"] == pytest.approx(alpha)
    assert [(p["chosen_sample"], p["rejected_sample"]) for p in pairs] == list(zip(chosen, reject))
    # each option matters here: without it the pairs differ from the authors'
    for off in (dict(keep_ties=False), dict(length_strip=False), dict(max_chosen_reward_on="reward")):
        other, _ = select_pairs(recs, PairsConfig(**{**PAPER_PAIRS, **off}, max_chosen_reward=bound))
        assert [(p["chosen_sample"], p["rejected_sample"]) for p in other] != list(zip(chosen, reject)), off


def test_keep_ties_keeps_identical_candidates():
    recs = [_rec("a", "es", k, "same", 0.5) for k in range(3)]
    assert select_pairs(recs, PairsConfig(length_control=False, language_filter=False))[0] == []
    pairs, _ = select_pairs(recs, PairsConfig(length_control=False, language_filter=False, keep_ties=True))
    assert [(p["chosen"], p["rejected"], p["chosen_sample"], p["rejected_sample"]) for p in pairs] == \
        [("same", "same", 0, 0)]


def test_length_strip_measures_stripped_text():
    recs = [_rec("a", "es", 0, "aaaa", 1.0), _rec("a", "es", 1, "b" + " " * 20, 0.9), _rec("a", "es", 2, "c", 0.0)]
    cfg = dict(language_filter=False, alpha_max=0.5, alpha_step=0.05)
    _, raw = select_pairs(recs, PairsConfig(**cfg))
    _, stripped = select_pairs(recs, PairsConfig(**cfg, length_strip=True))
    # raw lengths 4/21/1: alpha 0 leaves chosen 3 chars shorter than rejected... stripped 4/1/1 needs a penalty
    assert raw["per_language"]["es"]["alpha"] != stripped["per_language"]["es"]["alpha"]


def test_upper_bound_on_the_adjusted_score():
    recs = [_rec("a", "es", 0, "x" * 10, 12.0), _rec("a", "es", 1, "y" * 2, 9.0), _rec("a", "es", 2, "z", 0.0)]
    base = dict(language_filter=False, length_control=False, max_chosen_reward=10.0)
    assert select_pairs(recs, PairsConfig(**base))[0][0]["chosen_sample"] == 1  # raw 12 > 10: excluded
    # adjusted scores equal the raw ones here (alpha 0), strict bound: 12 excluded, 9 chosen; with bound 12, 12 excluded
    assert select_pairs(recs, PairsConfig(**base, max_chosen_reward_on="adjusted"))[0][0]["chosen_sample"] == 1
    b12 = {**base, "max_chosen_reward": 12.0}
    assert select_pairs(recs, PairsConfig(**b12))[0][0]["chosen_sample"] == 0  # raw bound: 12 <= 12 allowed
    assert select_pairs(recs, PairsConfig(**b12, max_chosen_reward_on="adjusted"))[0][0]["chosen_sample"] == 1


# --- the upper bound per iteration (the authors' iteration-2 runs: upper_bound_500) -----------------

def _bound_config(bound, iterations=2):
    from icr.config import config_from_dict

    return config_from_dict({"name": "b", "languages": ["en"], "iterations": iterations,
                             "models": {"dpo": "a", "sft": "b"}, "prompts": {"path": "p/{lang}.jsonl"},
                             "pairs": {"length_control": False, "language_filter": False,
                                       "max_chosen_reward": bound, "max_chosen_reward_on": "adjusted"}})


def _scored_stage(plan, recs):
    from icr.runs import write_json, write_jsonl

    plan.score_dir.mkdir(parents=True)
    write_jsonl(plan.score_dir / "shard-00000.jsonl", recs)
    write_json(plan.score_dir / "manifest.json", {"key": {"stage": "score", "t": plan.t}, "counts": {"scored": len(recs)}})


def test_the_bound_applies_per_iteration_and_keys_only_its_iteration(tmp_path):
    """`{2: 10}`: iteration 1 unbounded, iteration 2 bounded; changing iteration 2's bound
    recomputes iteration 2's pairs only."""
    from icr.plan import iteration_plan
    from icr.stages import run_pairs

    recs = [_rec("a", "en", 0, "x" * 10, 12.0), _rec("a", "en", 1, "y" * 2, 9.0), _rec("a", "en", 2, "z", 0.0)]
    cfg = _bound_config({2: 10})
    plans = [iteration_plan(cfg, tmp_path, t) for t in (1, 2)]
    for plan in plans:
        _scored_stage(plan, recs)
    chosen = {}
    for plan in plans:
        assert "skipped" not in run_pairs(cfg, plan)
        chosen[plan.t] = json.loads((plan.pairs_dir / "pairs.jsonl").read_text())["chosen_sample"]
        assert json.loads((plan.pairs_dir / "stats.json").read_text())["max_chosen_reward"] == (10.0 if plan.t == 2 else None)
    assert chosen == {1: 0, 2: 1}  # iteration 1: the best (12); iteration 2: 12 is not below 10
    wider = _bound_config({2: 20})
    assert run_pairs(wider, plans[0]).get("skipped")  # iteration 1's bound did not change: its pairs stand
    assert "skipped" not in run_pairs(wider, plans[1])
    assert json.loads((plans[1].pairs_dir / "pairs.jsonl").read_text())["chosen_sample"] == 0


def test_one_bound_for_every_iteration_keeps_the_old_key_and_behaviour():
    for bound in (None, 5.0):
        cfg = _bound_config(bound)
        assert cfg.pairs.iteration_hash(1) == cfg.pairs.iteration_hash(2) == cfg.section_hash("pairs")
        assert cfg.pairs.bound_at(1) == cfg.pairs.bound_at(2) == bound
    mapping = _bound_config({1: 5, 2: None})
    assert (mapping.pairs.bound_at(1), mapping.pairs.bound_at(2)) == (5.0, None)
    assert mapping.pairs.iteration_hash(1) == _bound_config(5.0).section_hash("pairs")
    assert mapping.pairs.iteration_hash(2) == _bound_config(None).section_hash("pairs")
    with pytest.raises(ValueError, match="at_iteration"):
        select_pairs([_rec("a", "en", 0, "x", 1.0)], mapping.pairs)


def test_bound_mapping_is_checked_and_survives_a_json_round_trip():
    from icr.config import config_from_dict
    from icr.errors import ConfigError

    assert _bound_config({"2": "5e2"}).pairs.max_chosen_reward == {2: 500.0}  # job files carry JSON keys
    cfg = _bound_config({2: 500})
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.pairs.max_chosen_reward == {2: 500.0} and again.pairs.iteration_hash(2) == cfg.pairs.iteration_hash(2)
    for bad, match in (({0: 1}, r"pairs\.max_chosen_reward: keys are iterations"),
                       ({"two": 1}, r"pairs\.max_chosen_reward: keys are iterations"),
                       ({2: "high"}, r"pairs\.max_chosen_reward\[2\]: expected a finite number"),
                       ({2: float("inf")}, r"pairs\.max_chosen_reward\[2\]: expected a finite number"),
                       ({2: 1, "2": 3}, r"pairs\.max_chosen_reward: iteration 2 given twice"),
                       ([1, 2], r"pairs\.max_chosen_reward: expected float or dict or null")):
        with pytest.raises(ConfigError, match=match):
            _bound_config(bad)


def test_without_lingua_the_filter_off_pairs_are_chosen_and_fidelity_is_null(tmp_path, monkeypatch):
    """lingua cannot travel to a bare GPU machine (bench/gpu_smoke.sh): with the language filter off
    the pairs stage runs without it (same pairs, fidelity null rather than 1); with the filter on
    the missing import stands."""
    import sys

    from icr.languages import language_identifier
    from icr.plan import iteration_plan
    from icr.stages import run_pairs

    recs = [_rec("a", "en", 0, "x" * 10, 12.0), _rec("a", "en", 1, "y" * 2, 9.0), _rec("a", "en", 2, "z", 0.0)]
    cfg = _bound_config(None, iterations=1)
    plan = iteration_plan(cfg, tmp_path, 1)
    _scored_stage(plan, recs)
    language_identifier.cache_clear()  # an identifier built earlier would hide the import
    monkeypatch.setitem(sys.modules, "lingua", None)  # `import lingua` raises ImportError
    try:
        assert "skipped" not in run_pairs(cfg, plan)
        pair = json.loads((plan.pairs_dir / "pairs.jsonl").read_text())
        assert (pair["chosen_sample"], pair["rejected_sample"]) == (0, 2)
        stats = json.loads((plan.pairs_dir / "stats.json").read_text())["per_language"]["en"]
        assert stats["candidate_fidelity"] is None and stats["chosen_fidelity"] is None
        filter_on = _bound_config(None, iterations=1)
        filter_on.pairs.language_filter = True
        plan_on = iteration_plan(filter_on, tmp_path / "filter-on", 1)
        _scored_stage(plan_on, recs)
        with pytest.raises(ImportError):
            run_pairs(filter_on, plan_on)
    finally:
        language_identifier.cache_clear()
