"""icr: Implicit Cross-Lingual Rewarding (Yang et al., arXiv 2503.04647).

An English preference-aligned model (pi0, DPO-tuned) and its reference (pi_SFT) judge answers in
other languages through their implicit reward, computed under the *English* instruction; the
best and worst of N samples per prompt become DPO pairs; training on them aligns the model in
those languages. Stages: generate -> score -> pairs -> train, repeated (see `icr.loop`).

Imports: `icr --help`, `icr config` and a mistyped argument answer at once (`import icr.cli` takes
~0.1 s; torch, which transformers, trl, peft, datasets and accelerate pull in, takes seconds). So:
- `icr.cli` imports only the standard library and `icr.errors` at the top of the file; each command
  imports what it runs inside its function. `icr/__init__.py` and `icr.errors` import nothing, and
  `icr/generation/__init__.py` (which `icr.cli.main` imports) the same as `icr.cli`.
- torch, transformers, trl, peft, datasets, accelerate and vllm are imported at the top only by
  modules that run a model and are imported only when one runs (`icr.generation.hf`,
  `icr.logprobs`); every other module imports them inside the function that uses them - most of
  the imports inside functions in icr are this rule.
- numpy may be imported at the top of the numeric modules (pairs, reward, scoring, metrics, ...),
  never by `icr.cli` or what it imports at the top.
tests/test_structure.py checks that `python -m icr.cli --help` and `icr.cli.build_parser()` load
none of these packages.
"""

__version__ = "0.1.0"
