"""Evaluation: X-AlpacaEval-style win rates per language with pluggable judges.

`evaluate.evaluate_model` generates, exports (`export`), judges (`judges`) and scores (`metrics`)
one model; `results` keeps `runs/<name>/results.json`; `icr.report` renders it. Submodules are
imported on use so that `import icr.evaluation` stays cheap.
"""
