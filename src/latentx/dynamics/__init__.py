"""Latent dynamics of hidden-state trajectories: pure, batched, differentiable tensor functions.

Every function takes hidden states ``H: [B, T, d]`` (any float dtype; computed in float32, or float64 when
given float64) and ``mask: [B, T]`` (bool, True on real response tokens, anywhere in the row: the valid rows
of each response are taken in their original order) and returns exactly the per-sequence answer of the
unpadded trajectory.  Specification: ``shared/docs/METHODS.md`` sections 1 (VERL effective rank) and 2
(ReLaX Koopman spectrum / DSD).
"""

from latentx.dynamics import entropy, koopman, rank
from latentx.dynamics._validate import check_trajectories, pack_valid
from latentx.dynamics.entropy import *  # noqa: F401,F403  (each module's public names, listed once in its __all__)
from latentx.dynamics.koopman import *  # noqa: F401,F403
from latentx.dynamics.rank import *  # noqa: F401,F403

__all__ = ["check_trajectories", "pack_valid", *rank.__all__, *koopman.__all__, *entropy.__all__]
