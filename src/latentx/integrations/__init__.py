"""Adapters that run latentx's objectives inside other training frameworks.

- :mod:`latentx.integrations.trl` — ``LatentGRPOTrainer`` / ``LatentGRPOConfig`` on top of TRL's
  ``GRPOTrainer`` (install with ``pip install "latentx[trl]"``).
- :mod:`latentx.integrations.verl` — a plugin for an unmodified verl 0.9.1 (FSDP actor, vLLM rollout,
  Ray), in its own environment (``make venv-verl``; see ``docs/verl.md``).

Sub-modules are imported on demand so that ``import latentx`` never pulls in an optional framework.
"""

from __future__ import annotations

__all__ = ["trl", "verl"]
