"""The GGUF tokenizer check runs on every transformers icr supports (no skip): a conversion that loses
the bos token or a turn marker's id is refused with one clear error, never used silently."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

from icr.errors import IcrError  # noqa: E402
from icr.models import check_gguf_tokenizer, gguf_checkpoint  # noqa: E402

from .tiny_gguf import _gguf_tokenizer_converts_right, write_tiny_gemma_gguf  # noqa: E402


class _Tokenizer:
    """A converted tokenizer as transformers 5.17/5.20 produce it: no bos in front (ids as the file's)."""

    bos_token, bos_token_id = "<bos>", 2

    def __init__(self, vocab: dict[str, int], add_bos: bool, turn_ids: dict[str, int] | None = None):
        self.vocab, self.add_bos, self.turn_ids = vocab, add_bos, turn_ids or {}

    def encode(self, text, add_special_tokens=True):
        ids = [self.turn_ids.get(text, self.vocab.get(text, 99))]
        return ([2] if add_special_tokens and self.add_bos else []) + ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-check") / "t.gguf"
    info = write_tiny_gemma_gguf(path)
    return path, {t: i for i, t in enumerate(info["tokens"])}


def test_a_tokenizer_that_encodes_as_the_file_says_passes(tiny):
    path, vocab = tiny
    check_gguf_tokenizer(_Tokenizer(vocab, add_bos=True), path)


def test_a_missing_bos_is_refused(tiny):
    path, vocab = tiny
    with pytest.raises(IcrError, match=r"does not start with the bos token '<bos>'.*transformers >= 5.24"):
        check_gguf_tokenizer(_Tokenizer(vocab, add_bos=False), path, "models.sft")


def test_a_turn_marker_under_another_id_is_refused(tiny):
    path, vocab = tiny
    with pytest.raises(IcrError, match=r"token '<end_of_turn>' encodes as \[69\], the file says \[6\]"):
        check_gguf_tokenizer(_Tokenizer(vocab, add_bos=True, turn_ids={"<end_of_turn>": 69}), path)


def test_the_installed_transformers_converts_right_or_is_refused(tiny):
    """5.24 converts the tiny file right; 5.17 and 5.20 drop bos and are refused (measured)."""
    path, _ = tiny
    if _gguf_tokenizer_converts_right():
        assert (gguf_checkpoint(str(path), None) / "tokenizer_config.json").is_file()
    else:
        with pytest.raises(IcrError, match="converts this GGUF tokenizer wrongly"):
            gguf_checkpoint(str(path), None)
