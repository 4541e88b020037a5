"""The sandbox: a multilingual world of checkable tasks, its oracle judge and its starting pair.

`icr.sandbox:prepare` (the config's `prepare.call`) builds the world, pi_SFT, pi0, the prompt and
reference files and the premise check into a cache folder; `OracleJudge` is the ground-truth judge;
`icr sandbox ablate` runs the ablations. The same world on the real Gemma-3-270M base
(configs/sandbox-gemma.yaml) is research code outside the package: bench/sandbox_gemma.py. See
docs/sandbox.md.
"""

from __future__ import annotations


def prepare(out_dir, **recipe) -> dict:
    from .build import prepare as _prepare

    return _prepare(out_dir, **recipe)


def __getattr__(name):
    if name == "OracleJudge":
        from .oracle import OracleJudge

        return OracleJudge
    raise AttributeError(name)


__all__ = ["prepare", "OracleJudge"]
