"""GGUF files as model sources: dequantized once into a cached normal checkpoint, used everywhere.

The GGUF file is a tiny Gemma-3 written by the test (tests/tiny_gguf.py); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the gguf package (dev extra) writes the test's GGUF file")

from icr.errors import IcrError  # noqa: E402
from icr.models import gguf_checkpoint, load_causal_lm, load_tokenizer  # noqa: E402

from .tiny_gguf import needs_gguf_tokenizer, write_tiny_gemma_gguf  # noqa: E402

pytestmark = needs_gguf_tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
            "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    info = write_tiny_gemma_gguf(folder / "tiny-gemma.gguf")
    return {"path": folder / "tiny-gemma.gguf", **info}


def test_gguf_loads_dequantized_with_the_original_weights_and_logits(tiny_gguf):
    import torch
    from transformers import Gemma3ForCausalLM

    model = load_causal_lm(str(tiny_gguf["path"]), "cpu", "float32")
    assert isinstance(model, Gemma3ForCausalLM) and model.dtype == torch.float32
    loaded = model.state_dict()
    for name, tensor in tiny_gguf["state"].items():
        assert torch.allclose(loaded[name], tensor, atol=1e-6), name  # norms: (1 + w) - 1 in fp32
    original = Gemma3ForCausalLM(tiny_gguf["config"]).eval()
    original.load_state_dict(tiny_gguf["state"])
    ids = torch.tensor([[2, 300, 301, 302, 303, 263]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)


def test_gguf_tokenizer_keeps_vocab_and_turn_tokens(tiny_gguf):
    tok = load_tokenizer(str(tiny_gguf["path"]), TEMPLATE)
    assert len(tok.get_vocab()) == len(tiny_gguf["tokens"])
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [5, 6]
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert ids[:2] == [2, 5] and tok.decode(ids, skip_special_tokens=False).endswith("<start_of_turn>model\n")


def test_converted_once_into_a_normal_checkpoint_then_reused(tiny_gguf, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = gguf_checkpoint(str(tiny_gguf["path"]), "float32")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "gemma3_text"
    source = json.loads((folder / "icr_gguf_source.json").read_text())
    assert source["file"] == str(tiny_gguf["path"].resolve()) and len(source["sha256"]) == 64
    # a plain from_pretrained reads it (so vLLM, TRL and a saved policy see an ordinary model) ...
    AutoModelForCausalLM.from_pretrained(folder)
    # ... and a second load does not dequantize again: the GGUF reader is never called.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    def refuse(*a, **k):
        raise AssertionError("GGUF file read a second time")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", refuse)
    assert gguf_checkpoint(str(tiny_gguf["path"]), "float32") == folder
    load_causal_lm(str(tiny_gguf["path"]), "cpu", "float32")


def test_folder_and_file_spelling_is_the_same_model(tiny_gguf):
    spec = f"{tiny_gguf['path'].parent}::{tiny_gguf['path'].name}"
    assert gguf_checkpoint(spec, "float32") == gguf_checkpoint(str(tiny_gguf["path"]), "float32")
    assert gguf_checkpoint(spec, None).name == "tokenizer"


def test_changed_file_is_converted_again_and_changes_the_model_key(tmp_path):
    from icr.runs import model_key

    path = tmp_path / "m.gguf"
    write_tiny_gemma_gguf(path, seed=0)
    first, key = gguf_checkpoint(str(path), "float32"), model_key(str(path))
    write_tiny_gemma_gguf(path, seed=1)
    assert gguf_checkpoint(str(path), "float32") != first
    assert model_key(str(path)) != key and model_key(f"{tmp_path}::m.gguf") == model_key(str(path))


@pytest.mark.parametrize("spec, needle", [("/nonexistent/x.gguf", "does not exist"),
                                           ("{tmp}::missing.gguf", "does not exist"),
                                           ("{tmp}::weights.bin", "folder::file.gguf")])
def test_bad_gguf_spec_is_one_clear_error(tmp_path, spec, needle):
    with pytest.raises(IcrError, match=needle):
        load_causal_lm(spec.format(tmp=tmp_path), "cpu", "float32", what="models.sft")


def test_not_a_gguf_file_is_a_clear_error_and_leaves_nothing(tmp_path, icr_cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(IcrError, match="broken.gguf"):
        load_causal_lm(str(bad), "cpu", "float32")
    assert not [p for p in Path(icr_cache).glob("gguf/broken-*/*")]


@pytest.mark.slow
def test_training_a_gguf_policy_saves_a_normal_checkpoint(tiny_gguf, tmp_path):
    """The train stage loads the policy from the GGUF spec and saves an ordinary checkpoint;
    `train.freeze` keeps the (tied) embedding as it was."""
    from icr.config import TrainConfig
    from icr.train import train_dpo

    pairs = [{"prompt": "Compute 2 + 3.", "chosen": "Answer: 5.", "rejected": "Answer: 7."},
             {"prompt": "Compute 1 + 1.", "chosen": "Answer: 2.", "rejected": "Answer: 9."}]
    cfg = TrainConfig(epochs=2, per_device_batch_size=2, learning_rate=1e-3, warmup_ratio=0.0, max_length=64, save_steps=100,
                      freeze=["embed_tokens"])
    spec = str(tiny_gguf["path"])
    train_dpo(pairs, spec, spec, cfg, tmp_path / "train", tmp_path / "model", seed=0, device="cpu",
              chat_template=TEMPLATE)
    saved = tmp_path / "model"
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    model = load_causal_lm(str(saved), "cpu", "float32")
    tok = load_tokenizer(str(saved))
    assert tok.chat_template == TEMPLATE and len(tok.get_vocab()) == len(tiny_gguf["tokens"])
    import torch

    trained = model.state_dict()
    assert torch.equal(trained["model.embed_tokens.weight"], tiny_gguf["state"]["model.embed_tokens.weight"])
    changed = [k for k, v in tiny_gguf["state"].items() if not torch.allclose(trained[k], v, atol=1e-6)]
    assert "model.layers.0.mlp.up_proj.weight" in changed


def test_freeze_naming_no_parameter_is_an_error(tiny_gguf):
    from icr.train import freeze_parameters

    model = load_causal_lm(str(tiny_gguf["path"]), "cpu", "float32")
    assert freeze_parameters(model, ["embed_tokens"]) == model.model.embed_tokens.weight.numel()
    assert not model.lm_head.weight.requires_grad  # tied to the embedding
    with pytest.raises(IcrError, match="train.freeze"):
        freeze_parameters(model, ["embedding_typo"])
