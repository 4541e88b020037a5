from icr.generation import SamplingParams, load_backend
from icr.errors import IcrError

import pytest


def _convs(n):
    return [[{"role": "user", "content": f"Name a colour. (#{i})" + " please" * (i % 3)}] for i in range(n)]


def test_hf_backend_samples_are_seeded_and_batch_independent_of_rerun(tiny_pair):
    backend = load_backend("hf", tiny_pair["dpo"], device="cpu", batch_size=3)
    params = SamplingParams(n=4, temperature=0.9, top_p=1.0, max_new_tokens=12, seed=7)
    a = backend.generate(_convs(5), params)
    b = backend.generate(_convs(5), params)
    assert a == b
    assert [len(x) for x in a] == [4] * 5
    assert len({s.text for x in a for s in x}) > 1  # sampling, not greedy
    c = backend.generate(_convs(5), SamplingParams(n=4, temperature=0.9, max_new_tokens=12, seed=8))
    assert c != a


def test_finished_flag_and_token_limit(tiny_pair):
    backend = load_backend("hf", tiny_pair["dpo"], device="cpu", batch_size=8)
    short = backend.generate(_convs(4), SamplingParams(n=3, max_new_tokens=2, seed=1))
    assert all(not s.finished and s.n_tokens == 2 for x in short for s in x)
    long = backend.generate(_convs(4), SamplingParams(n=3, max_new_tokens=64, seed=1))
    finished = [s for x in long for s in x if s.finished]
    assert finished and all("<|im_end|>" not in s.text for s in finished)


def test_greedy_is_deterministic_across_n(tiny_pair):
    backend = load_backend("hf", tiny_pair["dpo"], device="cpu")
    out = backend.generate(_convs(2), SamplingParams(n=2, temperature=0.0, max_new_tokens=10))
    assert out[0][0] == out[0][1]


def test_unknown_backend_and_missing_vllm(tiny_pair):
    with pytest.raises(IcrError, match="unknown backend 'fast'"):
        load_backend("fast", tiny_pair["dpo"])
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(IcrError, match="vllm is not installed"):
            load_backend("vllm", tiny_pair["dpo"])


def test_prefill_once_gives_the_same_samples_as_generate_expansion(tiny_pair):
    """Each prompt encoded once and its cache copied to the N samples: same logits, same draws."""
    backend = load_backend("hf", tiny_pair["dpo"], device="cpu", batch_size=4)
    convs = [[{"role": "user", "content": "Name a colour." + " please" * (3 * i)}] for i in range(6)]
    params = SamplingParams(n=5, temperature=0.9, max_new_tokens=16, seed=11)
    once = backend.generate(convs, params)
    backend.prefill_once = False
    expanded = backend.generate(convs, params)
    assert once == expanded
