"""icr: Implicit Cross-Lingual Rewarding (Yang et al., arXiv 2503.04647).

An English preference-aligned model (pi0, DPO-tuned) and its reference (pi_SFT) judge answers in
other languages through their implicit reward, computed under the *English* instruction; the
best and worst of N samples per prompt become DPO pairs; training on them aligns the model in
those languages. Stages: generate -> score -> pairs -> train, repeated (see `icr.loop`).
"""

__version__ = "0.1.0"
