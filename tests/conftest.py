"""Shared fixtures: tiny models built offline once per session, loaded through from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"sample data {path} is absent (it lives in ../shared/data beside a developer checkout)")
    return path


@pytest.fixture(scope="session", autouse=True)
def icr_cache(tmp_path_factory):
    """Prepared models of tests go to a temporary cache, never into the checkout."""
    path = tmp_path_factory.mktemp("icr-cache")
    old = os.environ.get("ICR_CACHE")
    os.environ["ICR_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ICR_CACHE", None)
    else:
        os.environ["ICR_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict:
    """The configs/tiny.yaml pair (pi_SFT, pi0) plus prompt files, built once."""
    from icr.tiny import prepare

    out = tmp_path_factory.mktemp("tinypair")
    paths = prepare(out, hidden_size=64, num_layers=2, n_train=6, n_eval=3, seed=0)
    return {**paths, "root": out}


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory) -> str:
    """A tiny model whose tokenizer differs from the tiny pair's."""
    from icr.tiny import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("othertok")
    tok = build_tokenizer(["completely different text corpus " * 5, "zzz yyy xxx"], vocab_size=300)
    model = build_model(tok, hidden_size=32, num_layers=1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture()
def cli(capsys):
    """Run the real CLI in-process; return (exit code, stdout, stderr)."""
    from icr.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def plain_logprob(model, prompt, response):
    """The obvious way: one sequence, full logits, full log-softmax (the scorers' reference)."""
    import torch

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response))


@pytest.fixture(scope="session")
def models(tiny_pair):
    """(tokenizer, pi0, pi_SFT) of the tiny pair, loaded through from_pretrained."""
    from icr.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_pair["dpo"])
    return tok, load_causal_lm(tiny_pair["dpo"], "cpu"), load_causal_lm(tiny_pair["sft"], "cpu")


def load_bench(name: str):
    """A bench/ script as a module (bench/ is not a package; its scripts import each other by name)."""
    import importlib.util
    import sys

    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
