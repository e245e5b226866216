"""VERL advantage shaping on verl's batch (METHODS.md section 3 "verl"), on the driver.

verl's v1 trainer computes advantages in ``PPOTrainer._compute_advantage``
(``verl/trainer/ppo/v1/trainer_base.py``) and stores them, nested per response, in TransferQueue.  A
registered advantage estimator cannot see per-response hidden-state signals (``compute_advantage`` passes
it only rewards, mask, uid and config), so the plugin shapes *after* verl's estimator: it reads
``advantages``, ``response_mask``, ``latentx_er/erv/era`` (written by the actor's old-log-prob forward) and
``rm_scores``, calls :meth:`latentx.objectives.VerlShaper.shape` (EMA baselines live in the shaper, on the
driver) and writes ``advantages`` back.  Padding rows that verl adds to divide the batch evenly are passed
through unchanged and do not enter the baselines.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from latentx.integrations.verl.loss import group_ids
from latentx.integrations.verl.signals import padded_field, per_response_values, response_layout
from latentx.objectives import VerlInputs, VerlShaper
from latentx.objectives.base import per_response_mean, valid_only

__all__ = ["SHAPING_FIELDS", "GROUP_FIELD", "shaping_fields", "shape_advantages"]

#: What :func:`shape_advantages` reads from the batch.
SHAPING_FIELDS = ("advantages", "response_mask", "rm_scores", "latentx_er", "latentx_erv", "latentx_era")
#: Also read with ``verl.aux_in_reward`` (GRPO re-runs on r + aux over verl's prompt groups).
GROUP_FIELD = "uid"


def shaping_fields(shaper: VerlShaper) -> list[str]:
    """The batch fields :func:`shape_advantages` needs for this shaper's configuration."""
    return list(SHAPING_FIELDS) + ([GROUP_FIELD] if shaper.cfg.behaviour.aux_in_reward else [])


def shape_advantages(
    data: Any, shaper: VerlShaper, keep: Tensor | None = None, norm_adv_by_std: bool = True
) -> tuple[Tensor, dict[str, float]]:
    """Shaped token advantages ``[B, W]`` float32 (0 at padding) and the shaper's info, prefixed ``latentx/``.

    Args:
        data: a TensorDict (or ``DataProto.batch``) with :data:`SHAPING_FIELDS`; ``advantages``,
            ``response_mask`` and ``rm_scores`` nested ``[B, j]`` or padded ``[B, W]``, ``latentx_*``
            nested / dense ``[B, 1]`` or ``[B]``.
        shaper: the driver's :class:`VerlShaper` (its baselines advance by one step).
        keep: optional bool ``[B]``: rows to shape (False = verl's padding rows, returned unchanged).
        norm_adv_by_std: verl's ``algorithm.norm_adv_by_std_in_grpo`` (False: Dr. GRPO), for the GRPO that
            ``verl.aux_in_reward`` re-runs on r + aux (verl's ε = 1e-6).

    Returns:
        ``(token_advantages [B, W], info)``; W is the longest response.
    """
    B, W, mask = response_layout(data, tuple(shaping_fields(shaper)), "latentx verl shaping")
    adv_tok = padded_field(data["advantages"], B, W).float()
    rewards = valid_only(padded_field(data["rm_scores"], B, W), mask).sum(dim=1)
    adv = per_response_mean(valid_only(adv_tok, mask), mask)
    er, erv, era = (per_response_values(data[k], k) for k in ("latentx_er", "latentx_erv", "latentx_era"))

    keep = torch.ones(B, dtype=torch.bool) if keep is None else keep.to(torch.bool).cpu()
    if keep.shape != (B,):
        raise ValueError(f"keep must be a bool [B] = [{B}] tensor, got shape {list(keep.shape)}")
    rows = keep.nonzero().flatten().to(mask.device)
    b = shaper.cfg.behaviour
    needs_rewards = shaper.cfg.performance_scaling or b.aux_in_reward or b.bf16
    group = None
    if b.aux_in_reward:
        uids = data[GROUP_FIELD]
        uids = uids if isinstance(uids, Tensor) or not hasattr(uids, "tolist") else uids.tolist()
        group = group_ids(uids, mask.device)[rows]
    inputs = VerlInputs(
        adv[rows], er[rows].to(adv.device), erv[rows].to(adv.device), era[rows].to(adv.device),
        rewards=rewards[rows] if needs_rewards else None, group=group, advantage_std=norm_adv_by_std,
    )
    shaped_rows, info = shaper.shape(inputs, mask[rows])
    out = valid_only(adv_tok, mask)
    if not b.inert:  # inert (the release): verl's advantages go back exactly as they came
        out[rows] = shaped_rows.to(out.dtype)
    return out, {f"latentx/{key}": value for key, value in info.items()}
