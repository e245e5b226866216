"""latentx — RLVR for reasoning language models, with exploration steered by hidden-state dynamics.

The methods are specified in ``shared/docs/METHODS.md`` (ReLaX: Koopman spectrum and Dynamic Spectral
Dispersion; VERL: effective rank and its velocity / acceleration).  The public surface:

- :mod:`latentx.dynamics` — pure tensor functions on hidden-state trajectories ``H[B,T,d]`` + ``mask``.
- :mod:`latentx.objectives` — GRPO and the latent / token-level exploration objectives.
- ``grade_answer``, ``extract_answer``, ``pass_at_k`` — the verifiable math grader and the metric.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "grade_answer", "extract_answer", "pass_at_k"]


def __getattr__(name: str):
    # Lazy re-exports: importing ``latentx`` must stay cheap (math-verify pulls in sympy).
    if name in ("grade_answer", "extract_answer"):
        from latentx.tasks import grading

        return getattr(grading, name)
    if name == "pass_at_k":
        from latentx.metrics import pass_at_k

        return pass_at_k
    raise AttributeError(f"module 'latentx' has no attribute {name!r}")
