"""The bad-input catalogue through the real CLI: exit code 2, one line naming the problem, no
traceback, and no run folder left behind."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import REPO


def _good_prompts(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"en": ["Name a colour.", "Name a fruit."], "es": ["Nombra un color.", "Nombra un fruto."]}
    for lang, texts in rows.items():
        (folder / f"{lang}.jsonl").write_text(
            "".join(json.dumps({"instruction_id": f"p{i}", "instruction": t}) + "\n" for i, t in enumerate(texts)))


def _config(tmp_path, tiny_pair, **changes):
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.pop("prepare")
    cfg.update(languages=["en", "es"], run_root=str(tmp_path / "runs"),
               models={"dpo": tiny_pair["dpo"], "sft": tiny_pair["sft"]},
               prompts={"path": str(tmp_path / "prompts" / "{lang}.jsonl")})
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


CASES = {
    # name: (config changes, prompt-file edit (lang, raw bytes) or None, expected text in the one line)
    "malformed-jsonl": ({}, ("es", b'{"instruction_id": "p0", "instruction": "Hola"}\n{oops\n'), "es.jsonl:2: invalid JSON"),
    "non-utf8": ({}, ("es", b'{"instruction_id": "p0", "instruction": "\xff\xfe"}\n'), "es.jsonl:1: not valid UTF-8"),
    "missing-english-counterpart": ({}, ("es", b'{"instruction_id": "zz", "instruction": "Hola"}\n'),
                                    "has no English counterpart"),
    "duplicate-id": ({}, ("es", b'{"instruction_id": "p0", "instruction": "a"}\n{"instruction_id": "p0", "instruction": "b"}\n'),
                     "es.jsonl:2: duplicate id p0"),
    "empty-instruction": ({}, ("es", b'{"instruction_id": "p0", "instruction": ""}\n'), "es.jsonl:1: empty instruction"),
    "unknown-language": ({"languages": ["en", "xx"]}, None, "languages: unknown language code 'xx'"),
    "language-without-prompts": ({"languages": ["en", "es", "de"]}, None, "de.jsonl: prompt file not found"),
    "unknown-field": ({"generation__temprature": 0.5}, None, "generation.temprature: unknown field (did you mean 'temperature'?)"),
    "n-below-2": ({"generation__n": 1}, None, "generation.n: must be >= 2"),
    "temperature-out-of-range": ({"generation__temperature": -0.5}, None, "generation.temperature: must be >= 0.0"),
    "top-p-out-of-range": ({"generation__top_p": 1.5}, None, "generation.top_p: must be <= 1.0"),
    "wrong-type": ({"train__epochs": "two"}, None, "train.epochs: expected float"),
    "missing-model": ({"models__dpo": "/nonexistent/model"}, None, "models.dpo: model path '/nonexistent/model' does not exist"),
    # numbers: finite, and within each field's range (before minutes of work, not after)
    "beta-infinite": ({"train__beta": float("inf")}, None, "train.beta: must be a finite number, got inf"),
    "temperature-nan": ({"generation__temperature": float("nan")}, None,
                        "generation.temperature: must be a finite number, got nan"),
    "learning-rate-nan-string": ({"train__learning_rate": "nan"}, None, "train.learning_rate: must be a finite number"),
    "seed-too-large": ({"seed": 2**70}, None, "seed: must be <= 9999999"),
    "seed-negative": ({"seed": -5}, None, "seed: must be >= 0, got -5"),
    "max-length-tiny": ({"train__max_length": 4}, None, "train.max_length: must be >= 32, got 4"),
    "warmup-ratio-one": ({"train__warmup_ratio": 1.0}, None, "train.warmup_ratio: must be < 1.0"),
    # names become folders: one path component
    "name-dotdot": ({"name": ".."}, None, "name: must be one folder name (letters, digits, . _ -"),
    "name-with-slash": ({"name": "a/b"}, None, "name: must be one folder name"),
    "control-label-escapes": ({"controls": [{"label": "../../x", "overrides": {}}]}, None,
                              "controls[0].label: must be one folder name"),
    # what failed with a traceback after work was done
    "prefix-with-another-placeholder": ({"reward__prefix": "Answer in {lang}: "}, None,
                                        "reward.prefix: only {language} may be a placeholder"),
    "freeze-empty-name": ({"train__freeze": [""]}, None, "train.freeze: names must be non-empty strings"),
    "unknown-optimizer": ({"train__optimizer": "adamw_8bit"}, None, "train.optimizer: 'adamw_8bit' is not one of "
                          "adamw_torch_fused, adamw_torch, adamw_bnb_8bit"),
    "unknown-lr-scheduler": ({"train__lr_scheduler": "cosinus"}, None,
                             "train.lr_scheduler: 'cosinus' is not a transformers scheduler"),
    "lone-surrogate-in-a-prompt": ({}, ("es", b'{"instruction_id": "p0", "instruction": "Hola \\ud800"}\n'),
                                   "es.jsonl:1: instruction field 'instruction' holds a lone surrogate"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, tmp_path, tiny_pair, cli):
    changes, edit, expected = CASES[name]
    _good_prompts(tmp_path / "prompts")
    if edit is not None:
        (tmp_path / "prompts" / f"{edit[0]}.jsonl").write_bytes(edit[1])
    code, out, err = cli("run", _config(tmp_path, tiny_pair, **changes))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("icr: error: ") and "Traceback" not in err, err
    assert expected in lines[0]
    assert not (tmp_path / "runs").exists()


def test_model_without_chat_template_exits_2(tmp_path, tiny_pair, cli):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_pair["dpo"], bare)
    (bare / "chat_template.jinja").unlink()
    cfg_json = json.loads((bare / "tokenizer_config.json").read_text())
    cfg_json.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg_json))
    _good_prompts(tmp_path / "prompts")
    code, _, err = cli("run", _config(tmp_path, tiny_pair, models__dpo=str(bare)))
    assert code == 2 and "has no chat template; set models.chat_template" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path, tiny_pair, cli):
    _good_prompts(tmp_path / "prompts")
    from icr.errors import IcrError

    with pytest.raises(IcrError):
        cli("run", _config(tmp_path, tiny_pair, generation__n=1), "--debug")


# ---------------------------------------------------------------------------------------------
# The wider catalogue (issue 13): each case through the real CLI, one line, nothing written
# ---------------------------------------------------------------------------------------------

def _write(path, data):
    if path.parent.is_file():  # a folder where a file was
        path.parent.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


def _eval_files(tmp_path):
    """Evaluation prompts (the training prompts) and references with ids for en and es."""
    refs = {"en": ["Name a colour.", "Name a fruit."], "es": ["Nombra un color.", "Nombra un fruto."]}
    for lang, texts in refs.items():
        _write(tmp_path / "refs" / f"{lang}.json", json.dumps(
            [{"id": f"p{i}", "instruction": t, "output": "x"} for i, t in enumerate(texts)]))


def compare_only_judge():
    """A judge that compares with references and cannot score answers alone (as alpaca_eval's)."""
    import types

    return types.SimpleNamespace(name="compare-only", compare=lambda items: [0.5] * len(items))


EVAL = {"evaluation__enabled": True, "evaluation__judge": "fake",
        "evaluation__prompts": {"path": "PROMPTS"}, "evaluation__references": "REFS"}


def _bad_model(kind):
    def setup(tmp_path, tiny_pair):
        import shutil

        folder = tmp_path / "model"
        if kind == "empty":
            folder.mkdir()
            return str(folder)
        shutil.copytree(tiny_pair["dpo"], folder)
        if kind == "config-types":
            cfg = json.loads((folder / "config.json").read_text())
            cfg["hidden_size"] = "sixty-four"
            (folder / "config.json").write_text(json.dumps(cfg))
        elif kind == "garbage-weights":
            (folder / "model.safetensors").write_bytes(b"this is not a weights file at all" * 10)
        elif kind == "truncated-weights":
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        elif kind == "no-weights":
            (folder / "model.safetensors").unlink()
            (folder / "notes.pt").write_bytes(b"not what transformers loads")
        elif kind == "more-layers-declared":  # config of a 3-layer model, weights of the 2-layer one
            cfg = json.loads((folder / "config.json").read_text())
            cfg["num_hidden_layers"] += 1
            cfg.pop("layer_types", None)
            (folder / "config.json").write_text(json.dumps(cfg))
        elif kind.startswith("sharded"):
            _shard(folder)
            if kind == "sharded-missing-shard":
                next(folder.glob("model-00002-of-*.safetensors")).unlink()
            elif kind == "sharded-missing-layer":
                index = json.loads((folder / "model.safetensors.index.json").read_text())
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".layers.1." not in k}
                (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return str(folder)
    return setup


def _shard(folder):
    """Re-save a model folder as sharded safetensors (several files and model.safetensors.index.json)."""
    import contextlib
    import io

    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):  # progress bars: the CLI's stderr must hold one line
        model = AutoModelForCausalLM.from_pretrained(folder)
        (folder / "model.safetensors").unlink()
        model.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2


WIDER = {
    # name: (config changes, {file under tmp_path: contents}, expected text in the one line)
    "empty-language-file": ({}, {"prompts/es.jsonl": ""}, "es.jsonl: no prompts (the file is empty"),
    "blank-lines-only": ({}, {"prompts/es.jsonl": "\n  \n\n"}, "es.jsonl: no prompts"),
    "instruction-not-a-string": ({}, {"prompts/es.jsonl": '{"instruction_id": "p0", "instruction": 42}\n'},
                                 "es.jsonl:1: instruction field 'instruction' must be a string, got int 42"),
    "null-id": ({}, {"prompts/es.jsonl": '{"instruction_id": null, "instruction": "Hola"}\n'},
                "es.jsonl:1: id field 'instruction_id' is null"),
    "prompt-path-is-a-folder": ({}, {"prompts/es.jsonl/x": ""}, "es.jsonl: is a directory, expected a prompt file"),
    "duplicate-yaml-key": ({}, {"config.yaml+": "seed: 7\n"}, "invalid YAML (duplicate key 'seed' (first at line"),
    "language-in-capitals": ({"languages": ["en", "ES"]}, {}, "unknown language code 'ES' (did you mean 'es'?)"),
    "reward-beta-removed": ({"reward__beta": 0.1}, {}, "reward.beta: removed"),
    "evaluation-without-judge": ({**EVAL, "evaluation__judge": ""}, {}, "evaluation.judge: required"),
    "judge-that-cannot-be-built": ({**EVAL, "evaluation__judge": "icr.sandbox:OracleJudge"}, {},
                                   "judge 'icr.sandbox:OracleJudge': bad judge_args"),
    "oracle-is-not-a-pipeline-judge": ({**EVAL, "evaluation__judge": "oracle"}, {}, "unknown judge 'oracle'"),
    "empty-evaluation-prompts": ({**EVAL, "evaluation__prompts": {"path": "EVALPROMPTS"}},
                                 {"evalprompts/en.jsonl": "", "evalprompts/es.jsonl": ""}, "en.jsonl: no prompts"),
    "non-utf8-references": (EVAL, {"refs/es.json": b'[{"id": "p0", "output": "\xff"}]'},
                            "es.json:1: not valid UTF-8"),
    "references-without-lang": ({**EVAL, "evaluation__references": "REFS_EN"}, {},
                                "evaluation.references.path: "),
    "references-of-another-language": (EVAL, {"refs/es.json": json.dumps(
        [{"id": "p0", "instruction": "Name a colour.", "output": "red"},
         {"id": "p1", "instruction": "Name a fruit.", "output": "apple"}])},
        "es.json row 1: reference id p0 is for the instruction 'Name a colour.'"),
    "language-without-references": ({**EVAL, "languages": ["en", "es", "de"],
                                     "evaluation__judge": "tests.test_bad_input:compare_only_judge"},
                                    {"prompts/de.jsonl": '{"instruction_id": "p0", "instruction": "Nenne eine Farbe."}\n'
                                                         '{"instruction_id": "p1", "instruction": "Nenne eine Frucht."}\n'},
                                    "evaluation.references: no reference file for de"),
    "model-config-wrong-types": ({"models__dpo": _bad_model("config-types")}, {},
                                 "models.dpo: cannot load the model config"),
    "model-folder-empty": ({"models__dpo": _bad_model("empty")}, {}, "models.dpo: cannot load the model config"),
    "model-weights-garbage": ({"models__dpo": _bad_model("garbage-weights")}, {},
                              "model.safetensors: not a valid safetensors file"),
    "model-weights-truncated": ({"models__sft": _bad_model("truncated-weights")}, {},
                                "model.safetensors: not a valid safetensors file (tensors end at byte"),
    "run-root-is-a-file": ({}, {"runs": "not a folder"}, "run_root: "),
    "model-without-weights": ({"models__dpo": _bad_model("no-weights")}, {},
                              "model has no weight files (model.safetensors or model.safetensors.index.json or"),
    "model-config-declares-more-layers": ({"models__sft": _bad_model("more-layers-declared")}, {},
                                          "the config declares 3 layers (num_hidden_layers) but the weights hold 2 "
                                          "(model.layers.N; missing 2)"),
    "model-shard-missing": ({"models__dpo": _bad_model("sharded-missing-shard")}, {},
                            "model.safetensors.index.json lists shard(s) that are not there: model-00002-of-"),
    "model-index-without-a-layer": ({"models__dpo": _bad_model("sharded-missing-layer")}, {},
                                    "the config declares 2 layers (num_hidden_layers) but the weights hold 1"),
    # chat templates: a named file must exist, text must render a user message into the prompt
    "chat-template-file-missing": ({"models__chat_template": "templates/missing.jinja"}, {},
                                   "models.chat_template: 'templates/missing.jinja' is not a file"),
    "chat-template-other-suffix": ({"models__chat_template": "templates/chat.j2"}, {"templates/chat.j2": "{{ x }}"},
                                   "models.chat_template: 'templates/chat.j2' is neither template text"),
    "chat-template-syntax-error": ({"models__chat_template": "{% for m in messages %}{{ m.content }"}, {},
                                   "models.chat_template: does not render a user message"),
    "chat-template-file-syntax-error": ({"models__chat_template": "CHATFILE"},
                                        {"chat.jinja": "{% for m in messages %}{{ m.content }}{% endif %}"},
                                        "models.chat_template: does not render a user message"),
    "chat-template-without-the-message": ({"models__chat_template": "{{ bos_token }}Answer: "}, {},
                                          "models.chat_template: the rendered prompt does not contain the user's"),
    # training setup: the accelerate config and the trackers are there
    "accelerate-config-unknown": ({"train__accelerate_config": "deepspeed_zero9"}, {},
                                  "train.accelerate_config: 'deepspeed_zero9' is neither a file nor a shipped config"),
    "accelerate-config-not-a-mapping": ({"train__accelerate_config": "ACCEL"}, {"accel.yaml": "- just a list\n"},
                                        "accel.yaml is not an accelerate config (expected a YAML mapping)"),
    "report-to-unknown": ({"train__report_to": ["wandbb"]}, {}, "train.report_to: unknown tracker 'wandbb'"),
}


@pytest.mark.parametrize("name", list(WIDER))
def test_wider_catalogue_exits_2_with_one_line_and_writes_nothing(name, tmp_path, tiny_pair, cli):
    changes, files, expected = WIDER[name]
    _good_prompts(tmp_path / "prompts")
    _eval_files(tmp_path)
    placeholders = {"PROMPTS": str(tmp_path / "prompts" / "{lang}.jsonl"),
                    "EVALPROMPTS": str(tmp_path / "evalprompts" / "{lang}.jsonl"),
                    "REFS": str(tmp_path / "refs" / "{lang}.json"), "REFS_EN": str(tmp_path / "refs" / "en.json"),
                    "CHATFILE": str(tmp_path / "chat.jinja"), "ACCEL": str(tmp_path / "accel.yaml")}

    def resolve(value):
        if callable(value):
            return value(tmp_path, tiny_pair)
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return placeholders.get(value, value) if isinstance(value, str) else value

    changes = {k: resolve(v) for k, v in changes.items()}
    config = _config(tmp_path, tiny_pair, **changes)
    for rel, data in files.items():
        if rel.endswith("+"):  # append to a file
            _write(tmp_path / rel[:-1], (tmp_path / rel[:-1]).read_text() + data)
        else:
            _write(tmp_path / rel, data)
    runs = tmp_path / "runs"
    before = runs.read_bytes() if runs.is_file() else None
    code, out, err = cli("run", config)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("icr: error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert (runs.read_bytes() == before) if before is not None else not runs.exists()


def test_set_on_a_config_that_is_a_list(tmp_path, cli):
    path = tmp_path / "config.yaml"
    path.write_text("- name: x\n")
    code, _, err = cli("run", path, "--set", "seed=1")
    assert code == 2 and err.strip().startswith("icr: error: ") and "expected a mapping of sections" in err
    assert len(err.strip().splitlines()) == 1


def test_unreadable_prompt_file(tmp_path, tiny_pair, cli):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode; the unreadable case cannot be set up")
    _good_prompts(tmp_path / "prompts")
    (tmp_path / "prompts" / "es.jsonl").chmod(0)
    code, _, err = cli("run", _config(tmp_path, tiny_pair))
    assert code == 2 and "es.jsonl: cannot read the prompt file (Permission denied)" in err
    assert not (tmp_path / "runs").exists()


def test_read_only_run_root(tmp_path, tiny_pair, cli):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes in read-only folders; the case cannot be set up")
    _good_prompts(tmp_path / "prompts")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    code, _, err = cli("run", _config(tmp_path, tiny_pair, run_root=str(tmp_path / "ro" / "runs")))
    assert code == 2 and "run_root: cannot write in" in err


def test_byte_order_mark_is_accepted_and_validate_checks_everything(tmp_path, tiny_pair, cli):
    _good_prompts(tmp_path / "prompts")
    es = tmp_path / "prompts" / "es.jsonl"
    es.write_bytes(b"\xef\xbb\xbf" + es.read_bytes())
    config = _config(tmp_path, tiny_pair)
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    code, out, err = cli("validate", config)
    assert code == 0 and out.strip() == f"{config}: ok", err
    # validate goes beyond the config: a broken weight file is found without running
    folder = _bad_model("garbage-weights")(tmp_path, tiny_pair)
    code, _, err = cli("validate", _config(tmp_path, tiny_pair, models__sft=folder))
    assert code == 2 and "not a valid safetensors file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_version(cli, capsys):
    import icr

    with pytest.raises(SystemExit) as stop:
        cli("--version")
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"icr {icr.__version__}"


@pytest.mark.parametrize("field", ["generation.backend", "reward.backend"])
def test_vllm_backend_without_vllm_is_refused_before_anything_runs(field, tmp_path, tiny_pair, cli):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    _good_prompts(tmp_path / "prompts")
    section, name = field.split(".")
    code, out, err = cli("run", _config(tmp_path, tiny_pair, **{f"{section}__{name}": "vllm"}))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"icr: error: {field}: vllm is not installed"), lines[0]
    assert not (tmp_path / "runs").exists()


def test_name_dotdot_with_force_deletes_nothing_outside_run_root(tmp_path, tiny_pair, cli):
    """`name: ..` made run_root/.. the run folder, and --force emptied it: the user's files beside
    run_root were deleted. Refused at config load now, before any folder is touched."""
    _good_prompts(tmp_path / "prompts")
    outside = tmp_path / "work"
    outside.mkdir()
    (outside / "config.yaml").write_text("name: something else\n")
    (outside / "thesis.tex").write_text("years of work")
    (outside / "results.json").write_text("[]")  # as if a run had computed something there
    config = _config(tmp_path, tiny_pair, name="..", run_root=str(outside / "runs"), iterations=1)
    code, _, err = cli("run", config, "--force")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "name: must be one folder name" in lines[0], err
    assert (outside / "thesis.tex").read_text() == "years of work"
    assert (outside / "config.yaml").read_text() == "name: something else\n"
    assert sorted(p.name for p in outside.iterdir()) == ["config.yaml", "results.json", "thesis.tex"]


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard", "mlflow"])
def test_report_to_a_tracker_that_is_not_installed(tracker, tmp_path, tiny_pair, cli):
    import importlib.util

    if any(importlib.util.find_spec(m) is not None for m in (tracker, tracker + "X")):
        pytest.skip(f"{tracker} is installed here")
    _good_prompts(tmp_path / "prompts")
    code, _, err = cli("validate", _config(tmp_path, tiny_pair, train__report_to=[tracker]))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == f"icr: error: train.report_to: {tracker} is not installed (pip install {tracker}), " \
                       "or remove it from train.report_to"
    assert not (tmp_path / "runs").exists()


def test_chat_template_file_and_text_that_work_validate(tmp_path, tiny_pair, cli):
    _good_prompts(tmp_path / "prompts")
    text = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    (tmp_path / "chat.jinja").write_text(text)
    for value in (str(tmp_path / "chat.jinja"), text):
        code, out, err = cli("validate", _config(tmp_path, tiny_pair, models__chat_template=value,
                                                 train__accelerate_config="ddp", train__report_to=["none"]))
        assert code == 0 and out.strip().endswith(": ok"), err


@pytest.mark.parametrize("kind", ["sharded", "bin"])
def test_sharded_and_bin_model_folders_pass_the_model_check(kind, tmp_path, tiny_pair):
    import shutil

    from icr.models import check_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_pair["dpo"], folder)
    if kind == "sharded":
        _shard(folder)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        (folder / "model.safetensors").unlink()
        import torch

        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    check_model(str(folder), "models.dpo")


def test_layer_check_takes_the_text_model_among_several_towers():
    """A multimodal checkpoint has a vision tower's layers too: one prefix holding every declared
    layer is enough; architectures without `layers.N.` names are not checked."""
    import types

    from icr.errors import IcrError
    from icr.models import _check_layer_count

    vision = [f"model.vision_tower.encoder.layers.{i}.mlp.weight" for i in range(4)]
    text = [f"model.language_model.layers.{i}.mlp.weight" for i in range(2)]
    _check_layer_count(types.SimpleNamespace(num_hidden_layers=2), vision + text, REPO, "m")
    _check_layer_count(types.SimpleNamespace(num_hidden_layers=2), ["transformer.h.0.attn.weight"], REPO, "m")
    with pytest.raises(IcrError, match=r"declares 3 layers .* hold 2 \(model.language_model.layers.N; missing 2\)"):
        _check_layer_count(types.SimpleNamespace(num_hidden_layers=3), text + vision[:2], REPO, "m")
