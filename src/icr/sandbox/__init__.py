"""The sandbox: a multilingual world of checkable tasks, its oracle judge and its starting pair.

`icr.sandbox:prepare` (the config's `prepare.call`) builds the world, pi_SFT, pi0, the prompt and
reference files and the premise check into a cache folder; `icr.sandbox:prepare_gemma` does the
same from the real Gemma-3-270M base model (configs/sandbox-gemma.yaml); `OracleJudge` is the
ground-truth judge. See docs/sandbox.md.
"""

from __future__ import annotations


def prepare(out_dir, **recipe) -> dict:
    from .build import prepare as _prepare

    return _prepare(out_dir, **recipe)


def prepare_gemma(out_dir, **recipe) -> dict:
    from .gemma import prepare_gemma as _prepare

    return _prepare(out_dir, **recipe)


def __getattr__(name):
    if name == "OracleJudge":
        from .oracle import OracleJudge

        return OracleJudge
    raise AttributeError(name)


__all__ = ["prepare", "prepare_gemma", "OracleJudge"]
