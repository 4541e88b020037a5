"""bench/bf16_save.py (issue 19): its arithmetic on hand-built weights, and its core function on a tiny
model: the figures' structure, and facts that hold whatever the training does (an update far larger
than bf16's spacing survives the rounding; one far smaller does not; a bf16 forward cannot tell an
fp32 save from a bf16 save)."""

from __future__ import annotations

import pytest
import torch

from .conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    module = load_bench("bf16_save")
    torch.set_num_threads(1)
    return module


def test_weight_figures_against_bf16_spacing_by_hand(bench):
    # 0.75 = 0.75 * 2^0: bf16 spacing 2^-8 in [0.5, 1), half a step 2^-9; 0.03125 = 2^-5: spacing 2^-12
    start = {"w": torch.tensor([0.75, 0.75, 0.75, 0.75, 0.03125, 0.03125])}
    assert torch.equal(bench.rounded(start)["w"], start["w"])  # bf16-representable: rounding is exact
    half = torch.tensor([2.0 ** -9] * 4 + [2.0 ** -13] * 2)
    end = {"w": start["w"] + half * torch.tensor([0.4, -0.4, 1.5, 0.0, -3.0, 0.25])}
    f = bench.weight_figures(start, end, lr_sum=1.0)
    assert f["changed_share"] == pytest.approx(5 / 6)
    assert f["kept_after_rounding"] == pytest.approx(2 / 5)  # only the 1.5 and 3 half-step moves survive
    assert f["update_over_half_step_median"] == pytest.approx(0.4, abs=1e-3)  # of 0.4, 0.4, 1.5, 3, 0.25 (fp32 sums)
    assert f["update_over_half_step_above_1"] == pytest.approx(2 / 5)
    assert f["mean_abs_update"] == pytest.approx(float((end["w"] - start["w"]).abs().mean()))
    assert torch.equal(bench.rounded(end)["w"][[0, 1, 5]], start["w"][[0, 1, 5]])


def test_core_function_on_a_tiny_model(bench):
    tiny = dict(hidden=32, layers=1, pretrain_steps=5, steps=6, batch=4, held_out=16, snapshots=(3,))
    big = bench.run_seed(0, lr=1e-2, **tiny)  # updates of ~1e-2: hundreds of bf16 half-steps
    assert set(big) >= {"seed", "pretrain", "param_rms", "params", "iteration1", "iteration2", "lora", "seconds"}
    assert set(big["iteration1"]) == {"3", "6"}
    for fig in [*big["iteration1"].values(), big["iteration2"]["off_grid_start"]]:
        assert set(fig["delta"]) == {"fp32", "bf16"} and set(fig["delta"]["fp32"]) == {"fp32_save", "bf16_save"}
        assert fig["bf16_compute_identical"]  # a bf16 forward rounds an fp32 save exactly as a bf16 save does
        assert fig["delta"]["bf16"]["fp32_save"] == fig["delta"]["bf16"]["bf16_save"]
        assert fig["kept_after_rounding"] > 0.95
        assert fig["share_bf16_save"] == pytest.approx(1.0, abs=0.05)
    assert big["lora"]["adapter_dtypes"] == ["torch.float32"]
    assert big["lora"]["merged_bf16_equals_merged_fp32_rounded"]  # peft's bf16 merge rounds once
    assert big["lora"]["share_merged_bf16"] == pytest.approx(1.0, abs=0.05)

    small = bench.run_seed(0, lr=5e-7, iteration2=False, lora=False, **tiny)  # ~1% of a half-step
    last = small["iteration1"]["6"]
    assert last["changed_share"] > 0.5  # fp32 masters record the update ...
    assert last["kept_after_rounding"] < 0.05  # ... which the bf16 rounding takes back almost everywhere
    assert last["update_over_half_step_median"] < 0.1
    assert last["bf16_compute_identical"]

    figures = bench.summarize([big, big], 6)  # the spread over seeds takes every figure of every seed
    assert figures["iteration1.6.share_bf16_save"]["n"] == 2
    assert figures["iteration1.6.share_bf16_save"]["sd"] == 0.0
