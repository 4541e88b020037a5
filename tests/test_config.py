
import pytest

from icr.config import ExperimentConfig, config_from_dict, describe_fields, load_config
from icr.errors import ConfigError

from .conftest import REPO

MINIMAL = {"name": "x", "languages": ["en", "es"], "models": {"dpo": "a", "sft": "b"},
           "prompts": {"path": "p/{lang}.jsonl"}}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.iterations >= 1


def test_paper_config_has_paper_settings():
    cfg = load_config(REPO / "configs" / "paper-llama3-8b.yaml")
    assert cfg.languages == ["en", "es", "ru", "de", "fr"]
    g = cfg.generation
    assert (g.n, g.temperature, g.top_p, g.max_new_tokens, cfg.seed) == (10, 0.9, 1.0, 2400, 42)
    assert (cfg.train.beta, cfg.train.nll_weight) == (0.1, 1.0)
    assert cfg.models.dpo == "princeton-nlp/Llama-3-Base-8B-SFT-DPO"
    assert load_config(REPO / "configs" / "paper-llama3-8b-lowres.yaml").languages == ["en", "bn", "sw", "th"]


@pytest.mark.parametrize("name", ["paper-llama3-8b.yaml", "paper-llama3-8b-lowres.yaml"])
def test_paper_configs_switch_every_icr_addition_off(name):
    cfg = load_config(REPO / "configs" / name)
    p = cfg.pairs
    assert not p.language_filter and not p.drop_truncated and p.keep_ties and p.length_strip
    assert p.max_chosen_reward_on == "adjusted" and p.min_margin is None and p.normalize == "none"
    assert cfg.generation.max_prompt_tokens == 8191  # nothing skipped that vLLM would take
    assert cfg.reward.token_set == "paper" and cfg.reward.batch_tokens == 32768 and cfg.workers == 8
    ev = cfg.evaluation  # the authors' judge and alpaca_eval's own LC
    assert ev.judge_args == {"annotators_config": "weighted_alpaca_eval_gpt4_turbo_multilingual"}
    assert ev.lc_method == "alpaca_eval"
    t = cfg.train  # the authors' only public hint (analysis_length.py:69)
    assert (t.learning_rate, t.per_device_batch_size, t.gradient_accumulation_steps) == (1e-7, 1, 4)


def test_recommended_config_keeps_icr_additions_on():
    cfg = load_config(REPO / "configs" / "icr-llama3-8b.yaml")
    assert cfg.pairs.language_filter and not cfg.pairs.keep_ties and cfg.generation.max_prompt_tokens is None
    assert cfg.workers == 8 and cfg.train.learning_rate == 5e-7


def _error(data) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, "cfg.yaml")
    return str(e.value)


def test_unknown_field_suggests_the_right_one():
    msg = _error({**MINIMAL, "generation": {"temprature": 0.5}})
    assert "generation.temprature: unknown field (did you mean 'temperature'?)" in msg


@pytest.mark.parametrize("section,field,value,expect", [
    ("generation", "n", 1, "generation.n: must be >= 2"),
    ("generation", "temperature", -0.1, "generation.temperature: must be >= 0.0"),
    ("generation", "top_p", 0.0, "generation.top_p: must be > 0.0"),
    ("generation", "top_p", 1.5, "generation.top_p: must be <= 1.0"),
    ("generation", "n", "ten", "generation.n: expected int"),
    ("reward", "variant", "english", "reward.variant: 'english' is not one of"),
])
def test_bad_values_name_the_field(section, field, value, expect):
    assert expect in _error({**MINIMAL, section: {field: value}})


def test_all_errors_reported_at_once():
    msg = _error({**MINIMAL, "languages": ["en", "xx"], "generation": {"n": 1, "top_p": 2}})
    assert "languages: unknown language code 'xx'" in msg
    assert "generation.n" in msg and "generation.top_p" in msg


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlanguages: [en\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_and_controls_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**MINIMAL, "controls": [{"label": "r", "overrides": {"pairs": {"selection": "random"}}}]}))
    cfg = load_config(path, ["generation.n=4"])
    assert cfg.generation.n == 4 and cfg.controls[0]["label"] == "r"
    msg = _error({**MINIMAL, "controls": [{"label": "r", "overrides": {"pairs": {"selction": "random"}}}]})
    assert "pairs.selction: unknown field" in msg


def test_describe_lists_every_field_with_help():
    lines = describe_fields()
    assert any(line.startswith("generation.temperature (default 0.9):") for line in lines)
    assert all(": " in line and not line.endswith(": ") for line in lines)


def test_validate_before_prepare_checks_the_config_only(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("ICR_CACHE", str(tmp_path / "empty-cache"))
    code, out, err = cli("validate", REPO / "configs" / "sandbox.yaml")
    assert code == 0 and "ok (config only: the prepare step has not run yet" in out, err
    assert not (tmp_path / "empty-cache").exists()  # validating builds nothing


def test_judge_required_when_the_run_uses_one():
    assert "evaluation.judge: required" in _error({**MINIMAL, "evaluation": {"enabled": True,
                                                                           "prompts": {"path": "e/{lang}.json"}}})
    assert "evaluation.judge: required" in _error({**MINIMAL, "pairs": {"selection": "judge"}})
    assert "evaluation.judge: required" in _error(
        {**MINIMAL, "controls": [{"label": "o", "overrides": {"pairs": {"selection": "judge"}}}]})
    assert config_from_dict(MINIMAL).evaluation.judge == ""  # no run that needs none
    assert "evaluation.models: unknown model 'M1'" in _error({**MINIMAL, "evaluation": {"models": ["M1"]}})


def test_references_string_is_the_path():
    cfg = config_from_dict({**MINIMAL, "evaluation": {"references": "r/{lang}.json"}})
    assert cfg.evaluation.references.path == "r/{lang}.json" and cfg.evaluation.references.output_field == "output"


def _float_fields(cls=ExperimentConfig, prefix=""):
    """Every float field of every config section, dotted (train.lora.dropout), walked from the
    dataclasses: a new float field is covered without touching the test."""
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(args[0]):
            yield from _float_fields(args[0], prefix + f.name + ".")
        elif float in args:
            yield prefix + f.name


def _nested(dotted, value):
    *parents, last = dotted.split(".")
    data = {last: value}
    for p in reversed(parents):
        data = {p: data}
    return data


FLOAT_FIELDS = list(_float_fields())


def test_the_float_walk_finds_the_sections_fields():
    assert {"train.beta", "generation.temperature", "train.lora.dropout", "evaluation.harness.limit",
            "pairs.min_margin"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("dotted", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "-Infinity"])
def test_every_float_field_refuses_nan_and_infinity(dotted, value):
    import copy

    data = copy.deepcopy(MINIMAL)
    top, _, rest = dotted.partition(".")
    data.update(_nested(dotted, value) if not rest else {top: _nested(rest, value)})
    assert f"{dotted}: must be a finite number" in _error(data)


def test_yaml_infinity_and_nan_are_refused_at_load(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "train: {beta: .inf}\n")
    with pytest.raises(ConfigError, match=r"train\.beta: must be a finite number, got inf"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"generation\.temperature: must be a finite number, got nan"):
        load_config(path, ["train.beta=0.1", "generation.temperature=.nan"])


@pytest.mark.parametrize("data,expect", [
    ({"seed": 2**70}, "seed: must be <= 9999999"),
    ({"seed": -5}, "seed: must be >= 0, got -5"),
    ({"train": {"max_length": 4}}, "train.max_length: must be >= 32, got 4"),
    ({"train": {"learning_rate": 0}}, "train.learning_rate: must be > 0.0"),
    ({"train": {"learning_rate": 3.0}}, "train.learning_rate: must be <= 1.0"),
    ({"train": {"beta": 0}}, "train.beta: must be > 0.0"),
    ({"train": {"warmup_ratio": 1.0}}, "train.warmup_ratio: must be < 1.0"),
    ({"train": {"lora": {"dropout": 1.0}}}, "train.lora.dropout: must be < 1.0"),
    ({"evaluation": {"temperature": 50.0}}, "evaluation.temperature: must be <= 5.0"),
    ({"evaluation": {"top_p": 0}}, "evaluation.top_p: must be > 0.0"),
    ({"generation": {"max_prompt_tokens": 0}}, "generation.max_prompt_tokens: must be >= 1"),
    ({"generation": {"batch_size": 2**70}}, "generation.batch_size: must fit in 64 bits"),
    ({"pairs": {"alpha_max": 100.0, "alpha_step": 1e-6}}, "pairs.alpha_max: the alpha grid"),
])
def test_numbers_out_of_their_range_are_refused(data, expect):
    assert expect in _error({**MINIMAL, **data})


def test_seed_range_keeps_every_derived_seed_valid():
    """The largest seed still gives valid seeds everywhere the code derives one: numpy (training,
    < 2**32) and torch's per-batch generate seed (< 2**63, vLLM's int64) for any shard and batch."""
    from icr.config import SEED_MAX

    cfg = config_from_dict({**MINIMAL, "seed": SEED_MAX, "iterations": 1000})
    last = cfg.seed + cfg.iterations - 1
    assert last < 2**32
    assert (last * 100_003 + 10**6) * 1_000_003 + 10**6 < 2**63
    assert "seed: must be <= " in _error({**MINIMAL, "seed": SEED_MAX + 1})


def test_describe_shows_declared_ranges():
    lines = describe_fields()
    assert any(line.startswith("train.warmup_ratio (default 0.1):") and line.endswith("[0.0 <= x < 1.0]")
               for line in lines)
    assert any(line.startswith("train.beta (default 0.1):") and line.endswith("[x > 0.0]") for line in lines)


BAD_NAMES = ["..", ".", "a/b", "a\\b", "/abs", "../up", "x/..", "a\x00b", "a\nb", "tab\there", " lead", ".hidden",
             "-option", "x" * 101, "naïve", "a b"]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_run_name_must_be_one_folder_name(bad):
    msg = _error({**MINIMAL, "name": bad})
    assert f"name: must be one folder name (letters, digits, . _ -" in msg and repr(bad) in msg


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_control_label_must_be_one_folder_name(bad):
    msg = _error({**MINIMAL, "controls": [{"label": "ok", "overrides": {}}, {"label": bad, "overrides": {}}]})
    assert "controls[1].label: must be one folder name" in msg and repr(bad) in msg


def test_empty_name_and_label_are_refused():
    assert "name: required" in _error({**MINIMAL, "name": ""})
    assert "controls[0]: expected {label: name" in _error({**MINIMAL, "controls": [{"label": "", "overrides": {}}]})


@pytest.mark.parametrize("good", ["tiny", "paper-llama3-8b-lowres", "run_1.v2", "A", "x" * 100, "a..b"])
def test_folder_names_that_are_fine(good):
    cfg = config_from_dict({**MINIMAL, "name": good, "controls": [{"label": good, "overrides": {}}]})
    assert cfg.name == good and cfg.controls[0]["label"] == good


@pytest.mark.parametrize("value,ok", [
    ("{% for m in messages %}{{ m.content }}{% endfor %}", True), ("templates/chat.jinja", True),
    ("{prepared}/chat.jinja", True), ("templates/chat.j2", False), ("chat.txt", False), ("chatml", False),
    ("", False), ("  ", False)])
def test_chat_template_is_text_or_a_jinja_file(value, ok):
    data = {**MINIMAL, "models": {**MINIMAL["models"], "chat_template": value}}
    if ok:
        assert config_from_dict(data).models.chat_template == value
    else:
        assert "models.chat_template: " in _error(data)


def test_report_to_holds_names():
    assert "train.report_to: expected tracker names" in _error({**MINIMAL, "train": {"report_to": [1]}})
