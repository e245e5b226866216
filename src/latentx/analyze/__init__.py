"""Latent-dynamics diagnostics of sampled responses (``latentx analyze``).

Sample R responses per prompt from one or more models (or ``latentx train`` checkpoints), compute per response
the ReLaX Koopman spectrum / DSD and the VERL effective-rank family (METHODS.md §1-§2) from one forward each,
and write tables (Parquet + CSV), figures (PNG) and a self-contained HTML report.

    from latentx.analyze import AnalyzeConfig, run_analysis
    analysis = run_analysis(AnalyzeConfig(models=["tiny"], prompts=8, samples=4, out="report"))

Importing this package is cheap (the CLI imports it); the heavy modules load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AnalyzeConfig",
    "Analysis",
    "AnalysisError",
    "run_analysis",
    "print_summary",
    "signal_defaults",
    "prefix_effective_ranks",
    "correlation_matrix",
    "group_dispersion",
]

_HOME = {
    "AnalyzeConfig": "pipeline",
    "Analysis": "pipeline",
    "AnalysisError": "pipeline",
    "run_analysis": "pipeline",
    "print_summary": "report",
    "signal_defaults": "signals",
    "prefix_effective_ranks": "signals",
    "correlation_matrix": "stats",
    "group_dispersion": "stats",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"latentx.analyze.{_HOME[name]}"), name)
    raise AttributeError(f"module 'latentx.analyze' has no attribute {name!r}")
