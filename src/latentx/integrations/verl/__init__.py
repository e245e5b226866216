"""latentx inside verl (0.9.1): ReLaX and VERL on verl's FSDP actor, vLLM rollout and Ray scale-out.

Use (docs/verl.md)::

    python -m latentx.integrations.verl.main <verl Hydra overrides> latentx.objective=relax latentx.relax.alpha=0.1

Pieces (all math comes from :mod:`latentx.dynamics` and :mod:`latentx.objectives`):

- :mod:`.plugin` — what verl's ``verl.plugins`` entry point (or ``VERL_USE_EXTERNAL_MODULES``) imports in
  every process that imports verl, Ray workers included: registers the ``latentx_sync`` trainer.
- :mod:`.trainer` — driver: verl's sync v1 trainer + the latentx worker + VERL shaping + checkpointed state.
- :mod:`.worker` — actor: backbone hook, per-response signals from the old-log-prob forward, DSD with
  gradient in the update forward, Koopman dictionary fit (rank 0) and broadcast.
- :mod:`.loss` — verl's ``ppo_loss`` + ReLaX's ``α·L_xp + β·KL_I`` (METHODS.md §3).
- :mod:`.advantage` — VERL shaping of verl's advantages (METHODS.md §3).
- :mod:`.signals` — packed / sequence-parallel hidden states -> response trajectories -> ER/ERV/ERA, DSD.
- :mod:`.settings` — the ``latentx`` config block.
- :mod:`.main` — the Hydra launcher (verl's ``ppo_trainer`` config + a ``latentx`` group).

Importing this package imports neither verl nor Ray; the sub-modules above (except settings) need verl.
"""

from __future__ import annotations

__all__ = ["VERL_VERSION", "PLUGIN_MODULE"]

#: The verl release this adapter was written and tested against.
VERL_VERSION = "0.9.1"
#: The module verl's plugin mechanism must import (entry point ``verl.plugins`` / VERL_USE_EXTERNAL_MODULES).
PLUGIN_MODULE = "latentx.integrations.verl.plugin"
