"""Token entropy of the policy's next-token distributions (METHODS.md section 3, ``entropy_bonus``).

H_t = -sum_v p_t(v) log p_t(v) with p_t = softmax(logits_t), computed in float32 (float64 for float64 input)
whatever the logits' dtype.  ``-inf`` logits (masked vocabulary entries) are allowed and contribute 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentx.dynamics._validate import check_mask, compute_dtype, first_bad_index

__all__ = ["token_entropies", "token_entropy"]


def _check_logits(logits: object) -> Tensor:
    if not isinstance(logits, Tensor) or logits.ndim != 3 or not logits.is_floating_point():
        shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point tensor of shape [B, T, V], got {shape}")
    if logits.shape[2] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    return logits


def token_entropies(logits: Tensor) -> Tensor:
    """Per-token entropy ``[B, T]`` of ``softmax(logits)`` (natural log), differentiable w.r.t. ``logits``.

    Positions whose logits hold NaN / +inf or are all -inf give NaN here; :func:`token_entropy` rejects them
    with a ``ValueError`` when they are valid tokens.
    """
    logits = _check_logits(logits)
    log_p = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    p = log_p.exp()
    # p * log p with p = 0 (a -inf logit) is 0; `where` keeps -inf out of both the value and the gradient.
    return -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(dim=-1)


def token_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean token entropy of every response over its valid tokens, ``Tensor[B]``.

    Args:
        logits: ``[B, T, V]`` in any float dtype (computed in float32; float64 if given float64).
        mask: ``[B, T]`` bool, True on response tokens.

    Returns 0 for a response without valid tokens.  Raises ``ValueError`` naming the response index when a
    valid position has NaN / +inf logits or no finite logit.  Padded positions never enter the computation,
    whatever they hold: their logits are *replaced* by zeros before the softmax (not multiplied by the mask
    afterwards, which lets a NaN / -inf padding logit put NaN into the gradient), so both the value and the
    gradient are exactly those of the valid tokens (METHODS.md section 0: padding is invisible).
    """
    logits = _check_logits(logits)
    mask = check_mask(mask, tuple(logits.shape[:2]), logits.device)
    logits = torch.where(mask[:, :, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    entropies = token_entropies(logits)
    bad = (mask & ~torch.isfinite(entropies.detach())).any(dim=1)
    if bool(bad.any()):
        raise ValueError(f"logits are not a valid distribution (NaN, +inf or all -inf) in response {first_bad_index(bad)}")
    count = mask.sum(dim=1)
    total = torch.where(mask, entropies, torch.zeros_like(entropies)).sum(dim=1)
    return total / count.clamp_min(1).to(total.dtype)
