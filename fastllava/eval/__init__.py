"""Evaluation: answer normalization and matching (``metrics``) and a runner that asks any answer function the
questions of a LLaVA-format JSON file and reports overall and per-question-type accuracy (``runner``).

Submodules are imported explicitly; this package module imports nothing.
"""
