import math
import sys
import types

import pytest

from icr.errors import IcrError
from icr.evaluation.judges import (SHIPPED_JUDGE_CONFIGS, AlpacaEvalJudge, CachedJudge, can_score, FakeJudge, JudgeItem,
                                   get_judge, resolve_annotators_config)


def items(n=3, lang="es"):
    return [JudgeItem(id=str(i), lang=lang, instruction=f"q{i}", output="x" * i, reference="xx") for i in range(n)]


def test_fake_judge_prefers_longer_and_scores():
    judge = get_judge("fake")
    assert judge.compare(items()) == [0.0, 0.0, 0.5]
    assert judge.score(items()) == [0.0, 1.0, 2.0]
    h = get_judge("fake", mode="hash")
    a = h.compare(items())
    assert a == h.compare(items()) and all(0 <= v < 1 for v in a)


def test_registry_errors_name_the_problem():
    with pytest.raises(IcrError, match=r"did you mean 'alpaca_eval'.*available: alpaca_eval, reward_model, fake"):
        get_judge("alpaca-eval")
    with pytest.raises(IcrError, match="bad judge_args"):
        get_judge("fake", colour="red")
    with pytest.raises(IcrError, match="cannot import"):
        get_judge("no_such_module_xyz:make")


def test_dotted_factory(monkeypatch):
    mod = types.ModuleType("my_judges")
    mod.make = lambda scale=1: types.SimpleNamespace(name="mine", compare=lambda its: [scale] * len(its))
    mod.bad = lambda: object()
    monkeypatch.setitem(sys.modules, "my_judges", mod)
    assert get_judge("my_judges:make", scale=1).compare(items(2)) == [1, 1]
    with pytest.raises(IcrError, match="lacks a `name`"):
        get_judge("my_judges:bad")

    mod.broken = lambda path: open(path)
    with pytest.raises(IcrError, match=r"judge 'my_judges:broken': cannot be built .*FileNotFoundError"):
        get_judge("my_judges:broken", path="/no/such/file")


def test_the_registry_knows_nothing_of_the_sandbox(tmp_path):
    """The sandbox's oracle is a plug-in named by its dotted path (configs/sandbox.yaml)."""
    from icr.evaluation.judges import JUDGES

    assert "oracle" not in JUDGES
    with pytest.raises(IcrError, match="unknown judge 'oracle'"):
        get_judge("oracle")
    with pytest.raises(IcrError, match=r"judge 'icr.sandbox:OracleJudge': bad judge_args .*world_dir"):
        get_judge("icr.sandbox:OracleJudge")


def test_cached_judge_asks_each_item_once(tmp_path):
    inner = FakeJudge()
    path = tmp_path / "cache.jsonl"
    judge = CachedJudge(inner, path, chunk_size=2)
    first = judge.compare(items(5))
    assert inner.calls == 5 and len(path.read_text().splitlines()) == 5
    assert judge.compare(items(5)) == first and inner.calls == 5
    # a new process reads the file; a truncated last line is ignored
    with open(path, "a") as fh:
        fh.write('{"key": "abc", "val')
    again = CachedJudge(FakeJudge(), path)
    assert again.compare(items(5)) == first and again.judge.calls == 0 and again.hits == 5
    # a different reference or language is a different judgement
    changed = [JudgeItem(id="0", lang="es", instruction="q0", output="", reference="")]
    assert again.compare(changed) == [0.5] and again.judge.calls == 1
    # score is cached separately and ignores the reference
    assert again.score(items(2)) == [0.0, 1.0] and again.judge.calls == 3
    assert again.score(items(2)) == [0.0, 1.0] and again.judge.calls == 3


def test_cached_judge_retries_failures_and_hides_missing_score(tmp_path):
    class Flaky:
        name = "flaky"
        calls = 0

        def compare(self, its):
            self.calls += 1
            return [math.nan if self.calls == 1 else 1.0 for _ in its]

    judge = CachedJudge(Flaky(), tmp_path / "c.jsonl")
    assert math.isnan(judge.compare(items(1))[0])
    assert judge.compare(items(1)) == [1.0]
    assert not can_score(judge)  # Flaky declares nothing and has no score method
    with pytest.raises(IcrError, match="cannot score single answers"):
        judge.score(items(1))
    assert can_score(CachedJudge(FakeJudge(), tmp_path / "d.jsonl"))


MULTILINGUAL = "weighted_alpaca_eval_gpt4_turbo_multilingual"
# sha256 of the authors' files (their alpaca_eval/src/alpaca_eval/evaluators_configs/<MULTILINGUAL>/, commit 168a420)
AUTHORS_SHA256 = {"configs.yaml": "24b307d879e19af808406a0ed33701c5917d648c8ec70f40543daa09b082b5ef",
                  "alpaca_eval_clf.txt": "10f5ddeae97ecab62bac9ff14d83c1fd1ce075d79b1db5efd750d7f92d772c26"}


def test_alpaca_eval_inputs_show_the_instruction_as_it_is():
    """No sentence appended to non-English instructions: the authors' judge says it in its template."""
    es, en = items(1, "es")[0], items(1, "en")[0]
    for it in (es, en):
        baseline, model = AlpacaEvalJudge.head2head_inputs([it])
        assert baseline[0]["instruction"] == model[0]["instruction"] == "q0"
        assert baseline[0]["output"] == it.reference and model[0]["output"] == it.output


def test_the_authors_multilingual_judge_is_shipped_unchanged():
    import hashlib

    folder = SHIPPED_JUDGE_CONFIGS / MULTILINGUAL
    for name, digest in AUTHORS_SHA256.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert resolve_annotators_config(MULTILINGUAL) == str(folder / "configs.yaml")
    assert resolve_annotators_config("weighted_alpaca_eval_gpt4_turbo") == "weighted_alpaca_eval_gpt4_turbo"


def _documented_render(template: str, row: dict) -> str:
    """alpaca_eval's documented prompt format (utils.make_prompts, batch 1): each {key} replaced once."""
    for key in ("instruction", "output_1", "output_2"):
        template = template.replace("{" + key + "}", str(row[key]), 1)
    return template


ITEM = JudgeItem(id="7", lang="es", instruction="¿Cuál es la capital de Francia?", output="París.",
                 reference="La capital de Francia es París.")


def test_rendered_prompt_has_the_multilingual_task_and_the_instruction_as_is():
    template = (SHIPPED_JUDGE_CONFIGS / MULTILINGUAL / "alpaca_eval_clf.txt").read_text(encoding="utf-8")
    baseline, model = AlpacaEvalJudge.head2head_inputs([ITEM])
    prompt = _documented_render(template, {"instruction": baseline[0]["instruction"],
                                           "output_1": baseline[0]["output"], "output_2": model[0]["output"]})
    assert '"instruction": """¿Cuál es la capital de Francia?""",' in prompt
    assert '"output": """La capital de Francia es París."""' in prompt and '"output": """París."""' in prompt
    assert ("## Task\n\nA good output should be in the same language as the instruction, except when the "
            "instruction explicitly requests the output in a different language. Evaluate") in prompt
    assert "{" + "instruction}" not in prompt


def test_prompt_icr_sends_equals_what_alpaca_eval_renders(monkeypatch):
    """The real thing: alpaca_eval's PairwiseAnnotator on the shipped config, its completion function
    replaced by one that records the prompts it is sent (no endpoint, no key)."""
    try:
        import alpaca_eval.annotators.base as base
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"alpaca_eval not importable ({type(e).__name__}: {e}); the eval extra installs it")
    sent = []

    def fake_completions(prompts, **kwargs):
        sent.extend(prompts)
        return {"completions": ["m"] * len(prompts), "completions_all": [
            {"logprobs": {"content": [{"top_logprobs": [{"token": "m", "logprob": 0.0}]}]}}] * len(prompts),
            "price_per_example": [0.0] * len(prompts), "time_per_example": [0.0] * len(prompts)}

    monkeypatch.setattr(base, "get_fn_completions", lambda name: fake_completions)
    judge = get_judge("alpaca_eval", annotators_config=MULTILINGUAL, is_randomize_output_order=False)
    assert judge.name == "alpaca_eval:" + MULTILINGUAL
    judge.compare([ITEM])
    template = (SHIPPED_JUDGE_CONFIGS / MULTILINGUAL / "alpaca_eval_clf.txt").read_text(encoding="utf-8")
    want = _documented_render(template, {"instruction": ITEM.instruction, "output_1": ITEM.reference,
                                         "output_2": ITEM.output})
    assert sent and sent[0] == want


def test_alpaca_eval_maps_preferences():
    class FakeAnnotator:
        def annotate_head2head(self, outputs_1, outputs_2, is_ordered):
            prefs = [2.0, 1.0, 1.5, None, 1.75]
            return [{"instruction": a["instruction"], "output_1": a["output"], "output_2": b["output"], "preference": p}
                    for a, b, p in zip(reversed(outputs_1), reversed(outputs_2), prefs)]

    judge = AlpacaEvalJudge.__new__(AlpacaEvalJudge)
    judge.annotator, judge.name = FakeAnnotator(), "alpaca_eval:fake"
    out = judge.compare(items(5))  # annotations come back in another order: matched by content
    assert out[4] == 1.0 and out[3] == 0.0 and out[2] == 0.5 and math.isnan(out[1]) and out[0] == 0.75


def test_alpaca_eval_import_error_is_actionable(monkeypatch):
    monkeypatch.setitem(sys.modules, "alpaca_eval", None)
    monkeypatch.setitem(sys.modules, "alpaca_eval.annotators", None)
    with pytest.raises(IcrError, match=r"needs the alpaca-eval package: pip install 'alpaca-eval==0.6.6'"):
        get_judge("alpaca_eval")


def test_reward_model_judge(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from icr.tiny import build_tokenizer

    tok = build_tokenizer(["hola mundo que tal", "hello world how are you"] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = get_judge("reward_model", model=str(tmp_path / "rm"), device="cpu", batch_size=2)
    assert judge.name == "reward_model:rm"
    its = [JudgeItem("1", "es", "hola", "mundo que tal", "hello"), JudgeItem("2", "es", "hola", "hola", "hola")]
    s_out, s_same = judge.score(its)
    s_ref = judge.score([JudgeItem("1", "es", "hola", "hello")])[0]
    prefs = judge.compare(its)
    assert prefs[0] == pytest.approx(1 / (1 + math.exp(-(s_out - s_ref))), abs=1e-4)
    assert prefs[1] == pytest.approx(0.5, abs=1e-4)


def test_alpaca_eval_judge_end_to_end_offline(tmp_path):
    """Through alpaca_eval's real PairwiseAnnotator, with its offline `test_completions` decoder
    (always answers "M" = the second output shown) standing in for the LLM endpoint."""
    try:
        import alpaca_eval
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"alpaca_eval not importable ({type(e).__name__}: {e})")
    from pathlib import Path

    template = Path(alpaca_eval.__file__).parent / "evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
    config = tmp_path / "offline" / "configs.yaml"
    config.parent.mkdir()
    config.write_text(f"""offline:
  prompt_template: "{template}"
  fn_completions: "test_completions"
  completions_kwargs: {{model_name: "test", value: "M"}}
  fn_completion_parser: "regex_parser"
  completion_parser_kwargs: {{outputs_to_match: {{1: '^m', 2: '^M'}}}}
  is_randomize_output_order: false
  batch_size: 1
""")
    judge = get_judge("alpaca_eval", annotators_config=str(config))
    assert judge.name == "alpaca_eval:offline"
    # output_2 (the model) always wins, except item 2 whose output equals its reference: alpaca_eval's tie
    assert judge.compare(items(4)) == [1.0, 1.0, 0.5, 1.0]


def test_a_cached_judge_passes_on_what_its_judge_declares(tmp_path):
    """Capabilities are declared, and the cache in front of a judge keeps them (diagnostics split the
    reward's agreement by `pair_kind`; reward agreement needs `scores_single_answers`)."""
    from icr.diagnostics import reward_agreement

    class Kinds(FakeJudge):
        def pair_kind(self, a, b, pid, lang):
            return "length" if len(a) != len(b) else "other"

    cached = CachedJudge(Kinds(), tmp_path / "k.jsonl")
    assert can_score(cached) and cached.pair_kind is not None
    assert CachedJudge(FakeJudge(), tmp_path / "f.jsonl").pair_kind is None
    assert AlpacaEvalJudge.scores_single_answers is False  # pairwise only, declared on the class
    scored = [{"id": "p", "lang": "en", "prompt": "q", "response": r, "reward": w}
              for r, w in (("a", 0.0), ("abc", 1.0), ("ab", 2.0))]
    got = reward_agreement(scored, cached)
    assert set(got["en"]) == {"all", "length"} and got["en"]["length"]["n"] == 3


def test_icr_config_names_every_registered_judge(cli):
    from icr.evaluation.judges import JUDGES

    code, out, _ = cli("config")
    line = next(x for x in out.splitlines() if x.startswith("evaluation.judge "))
    assert code == 0 and all(name in line for name in JUDGES), line


@pytest.mark.parametrize("path", ["/nonexistent/rm", "./models/rm", "runs/x/rm-model"])
def test_a_missing_reward_model_folder_is_named(path):
    """Before: transformers' "Repo id must use alphanumeric chars" for a mistyped local path."""
    with pytest.raises(IcrError, match=f"evaluation.judge_args.model: no reward model at {path}"):
        get_judge("reward_model", model=path)
