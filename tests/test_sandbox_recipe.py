"""The sandbox recipes (`prepare.args`): documented dataclasses, strict, and keyed exactly as before.

The keys pinned here were computed before the recipes became dataclasses (plain DEFAULTS dicts); an
already-built prepared folder or step-store entry stays valid only while they hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import yaml

from bench.sandbox_gemma import GemmaRecipe, _step_dir
from icr.errors import IcrError
from icr.sandbox import build
from icr.sandbox.recipe import check, defaults

REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_toy_recipe_json_is_unchanged(tmp_path):
    cfg, out = build.recipe_folder(tmp_path / "p", {"seed": 0}, build.ToyRecipe, "x")  # configs/sandbox.yaml's args
    # changed on purpose by issue 25: the self-check's floors and repair (sft_floor_*, pi0_floor_language,
    # sft_repair_*, pi0_repair_rounds) and dpo_pair_kinds (no `language` pairs for pi0); before: 1146241eff0b5be6
    assert _sha(out / "recipe.json") == "4c66d06fa29c41a9"
    assert cfg == build.DEFAULTS


def test_gemma_recipe_and_step_keys_are_unchanged(tmp_path):
    args = yaml.safe_load((REPO / "configs" / "sandbox-gemma.yaml").read_text())["prepare"]["args"]
    cfg, out = build.recipe_folder(tmp_path / "p", args, GemmaRecipe, "x")
    # the recorded run's recipe, byte for byte
    assert (out / "recipe.json").read_bytes() == (REPO / "docs/results/sandbox-gemma/recipe.json").read_bytes()
    assert [_step_dir(out, cfg, s).name for s in ("sft", "pairs", "dpo")] == [
        "sft-dfab1f5baa5d2d6a", "pairs-cc7cd51a931a95c9", "dpo-8287b8f091932566"]


def test_values_are_kept_as_given():
    """An int for a float field is accepted and stored as given (converting it would change keys)."""
    assert check(GemmaRecipe, {"dpo_nll_weight": 1}, "x")["dpo_nll_weight"] == 1
    assert check(GemmaRecipe, {"dpo_pair_kinds": None}, "x")["dpo_pair_kinds"] is None
    assert check(build.ToyRecipe, {}, "x") == defaults(build.ToyRecipe) == build.DEFAULTS


@pytest.mark.parametrize("recipe_class", [build.ToyRecipe, GemmaRecipe])
def test_every_field_is_documented(recipe_class):
    for f in dataclasses.fields(recipe_class):
        assert len(f.metadata.get("help", "")) > 10, f.name


@pytest.mark.parametrize("recipe, message", [
    ({"n_evl": 5}, "prepare.args.n_evl: unknown recipe argument (did you mean 'n_eval'?)"),
    ({"n_eval": "60"}, "prepare.args.n_eval: expected int, got str '60'"),
    ({"n_eval": True}, "prepare.args.n_eval: expected int, got bool True"),
    ({"dpo_lr": "5e-6"}, "prepare.args.dpo_lr: expected float, got str '5e-6' (YAML reads 5e-6 as text"),
    ({"freeze": "embed_tokens"}, "prepare.args.freeze: expected list of str, got str"),
    ({"dpo_pair_kinds": [1]}, "prepare.args.dpo_pair_kinds: expected list of str or null, got list [1]"),
])
def test_unknown_argument_or_wrong_type_is_one_line_naming_the_field(tmp_path, recipe, message):
    with pytest.raises(IcrError) as e:
        build.recipe_folder(tmp_path / "p", recipe, GemmaRecipe, "prepare_gemma")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "p").exists()  # refused before anything is built


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(IcrError, match=r"prepare\.args\.nope: unknown.*; prepare\.args\.seed: expected int"):
        build.prepare(tmp_path / "p", nope=1, seed=0.5)


def test_the_cli_reports_a_bad_recipe_in_one_line(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("ICR_CACHE", str(tmp_path / "cache"))
    code, _, err = cli("run", REPO / "configs" / "sandbox.yaml", "--set", f"run_root={tmp_path}",
                       "--set", 'prepare.args={"seed": 0, "pretrain_step": 5}')
    assert code == 2
    assert "prepare.args.pretrain_step: unknown recipe argument (did you mean 'pretrain_steps'?)" in err
    assert "Traceback" not in err
