"""Latent dynamics of hidden-state trajectories: pure, batched, differentiable tensor functions.

Every function takes hidden states ``H: [B, T, d]`` (any float dtype; computed in float32, or float64 when
given float64) and ``mask: [B, T]`` (bool, True on real response tokens, anywhere in the row: the valid rows
of each response are taken in their original order) and returns exactly the per-sequence answer of the
unpadded trajectory.  Specification: ``shared/docs/METHODS.md`` sections 1 (VERL effective rank) and 2
(ReLaX Koopman spectrum / DSD).
"""

from latentx.dynamics._validate import check_trajectories, pack_valid
from latentx.dynamics.entropy import token_entropies, token_entropy
from latentx.dynamics.koopman import (
    AUTHORS_SEED,
    RIDGE_FLOOR,
    KoopmanSettings,
    authors_settings,
    DSDInfo,
    KoopmanDictionary,
    KoopmanSpectrum,
    dsd,
    dsd_reference,
    dsd_with_info,
    edmd,
    koopman_operator,
    koopman_spectrum,
)
from latentx.dynamics.rank import RankDynamics, effective_rank, rank_dynamics, rank_dynamics_reference

__all__ = [
    "check_trajectories",
    "pack_valid",
    "effective_rank",
    "rank_dynamics",
    "rank_dynamics_reference",
    "RankDynamics",
    "KoopmanDictionary",
    "KoopmanSettings",
    "RIDGE_FLOOR",
    "AUTHORS_SEED",
    "authors_settings",
    "KoopmanSpectrum",
    "DSDInfo",
    "edmd",
    "koopman_operator",
    "koopman_spectrum",
    "dsd",
    "dsd_with_info",
    "dsd_reference",
    "token_entropy",
    "token_entropies",
]
