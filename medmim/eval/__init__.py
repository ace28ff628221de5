"""Evaluation: metrics (the one metrics module, ``metrics.py``), per-case predictions, plots, the
reconstruction grid and the static study report. Map: docs/contracts.md."""
