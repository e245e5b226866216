"""The latent monitor on verl's driver (``latentx.monitor=true``; docs/verl.md).

The actor's old-log-prob forward writes ``latentx_er`` / ``latentx_erv`` / ``latentx_era`` / ``latentx_dsd``
(one value per response, :mod:`latentx.integrations.verl.worker`) and verl writes the per-token ``entropy``
of the same forward and the ``rm_scores`` into TransferQueue.  After verl's advantage step the driver reads
them and logs :func:`latentx.monitor.monitor_metrics` of the batch under ``latent/`` (reward of a response =
the sum of its ``rm_scores``, as verl scores it; entropy = its mean token entropy).  Nothing is written
back: verl's advantages and loss are untouched.  Padding rows verl adds to divide the batch are left out.
``latentx_dsd`` is NaN on the first step (the dictionary is fitted at the end of that step's forward), so
the ``dsd_*`` statistics start on step 2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from latentx.integrations.verl.signals import padded_field, per_response_values, response_layout
from latentx.monitor import monitor_metrics
from latentx.objectives.base import per_response_mean, valid_only

__all__ = ["MONITOR_FIELDS", "monitor_batch_metrics"]

#: What :func:`monitor_batch_metrics` reads from the batch.
MONITOR_FIELDS = ("response_mask", "rm_scores", "entropy", "latentx_er", "latentx_erv", "latentx_era", "latentx_dsd")


def monitor_batch_metrics(data: Any, keep: Tensor | None = None) -> dict[str, float]:
    """``latent/``-prefixed monitor statistics of one verl batch (module docstring).

    Args:
        data: a TensorDict with :data:`MONITOR_FIELDS` (nested ``[B, j]`` or padded ``[B, W]`` token fields,
            nested / dense ``[B, 1]`` or ``[B]`` ``latentx_*``).
        keep: optional bool ``[B]``, False on verl's padding rows.
    """
    B, W, mask = response_layout(data, MONITOR_FIELDS, "the latentx monitor")
    rewards = valid_only(padded_field(data["rm_scores"].float(), B, W), mask).sum(dim=1)
    values = {key[len("latentx_"):]: per_response_values(data[key], key) for key in MONITOR_FIELDS[3:]}
    values["entropy"] = per_response_mean(valid_only(padded_field(data["entropy"].float(), B, W), mask), mask)
    if keep is not None:
        keep = keep.to(torch.bool).cpu()
        if keep.shape != (B,):
            raise ValueError(f"keep must be a bool [B] = [{B}] tensor, got shape {list(keep.shape)}")
        rewards = rewards[keep.to(rewards.device)]
        values = {name: value[keep.to(value.device)] for name, value in values.items()}
    metrics = monitor_metrics(values, rewards)
    metrics["monitor/responses"] = float(rewards.numel())
    return {f"latent/{key}": value for key, value in metrics.items()}
