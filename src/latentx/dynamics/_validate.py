"""Input checks and padding helpers shared by every function of :mod:`latentx.dynamics`.

METHODS.md section 0: every function takes a padded batch ``H: [B, T, d]`` plus ``mask: [B, T]`` and must
give exactly the per-sequence answer of the unpadded trajectory.  ``mask`` is treated generally: the
valid rows of response ``b`` are ``H[b, mask[b]]`` *in their original order*, wherever they sit (a prefix,
left padding, holes).  :func:`pack_valid` moves them to the front of each row so that the numerical
kernels only ever see "valid prefix + zero padding".
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_trajectories", "check_mask", "compute_dtype", "pack_valid", "first_bad_index"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype (bf16, f16, f32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_bad_index(bad: Tensor) -> int:
    """Index of the first True entry of a 1-D bool tensor."""
    return int(torch.nonzero(bad)[0, 0])


def check_mask(mask: object, shape: tuple[int, int], device: torch.device, name: str = "mask") -> Tensor:
    """Validate a ``[B, T]`` mask and return it as a bool tensor.

    Accepts bool tensors and integer tensors holding only 0 / 1 (e.g. a Hugging Face ``attention_mask``).
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the trajectories are on {device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{name} must be a bool (or 0/1 integer) tensor, got dtype {mask.dtype}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} is an integer tensor with values other than 0 and 1")
    return mask.bool()


def check_trajectories(H: object, mask: object, name: str = "H", mask_name: str = "mask") -> tuple[Tensor, Tensor]:
    """Validate ``H: [B, T, d]`` (floating) and ``mask: [B, T]``; return ``(H, bool mask)``.

    Raises ``ValueError`` naming the argument for shape / dtype / device problems and naming the response
    index when a *valid* row of ``H`` holds NaN or inf.  Non-finite values in padded rows are allowed and
    never reach the computation (padded rows are replaced, not multiplied, by zeros).
    """
    if not isinstance(H, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, T, d], got {type(H).__name__}")
    if H.ndim != 3:
        raise ValueError(f"{name} must have shape [B, T, d], got {list(H.shape)}")
    if not H.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {H.dtype}")
    if H.shape[2] == 0:
        raise ValueError(f"{name} has hidden size d = 0")
    mask_b = check_mask(mask, (H.shape[0], H.shape[1]), H.device, mask_name)
    if H.numel():
        # One cheap pass first: a row sum is finite when every entry is (NaN / inf propagate).  Only when
        # some sum is not (a non-finite entry, or an overflow of huge finite values) do the exact check.
        row_sums = H.detach().sum(dim=-1, dtype=torch.float64 if H.dtype == torch.float64 else torch.float32)
        if not bool(torch.isfinite(row_sums).all()):
            finite_rows = torch.isfinite(H.detach()).all(dim=-1)
            bad = (mask_b & ~finite_rows).any(dim=1)
            if bool(bad.any()):
                i = first_bad_index(bad)
                raise ValueError(f"{name} has non-finite values (NaN or inf) in response {i}")
    return H, mask_b


def pack_valid(H: Tensor, mask: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Gather each response's valid rows, in order, to the front; zero the rest.

    Returns ``(X, lengths)`` with ``X: [B, T_max, d]`` (``T_max`` = longest response) in ``dtype`` (default:
    :func:`compute_dtype` of ``H``) and ``lengths: [B]`` (int64).  Differentiable w.r.t. ``H`` (gather + where).
    """
    dtype = compute_dtype(H.dtype) if dtype is None else dtype
    B, T, d = H.shape
    lengths = mask.sum(dim=1)
    t_max = int(lengths.max()) if B > 0 and T > 0 else 0
    positions = torch.arange(T, device=H.device)
    if torch.equal(mask, positions[None, :] < lengths[:, None]):  # already "valid prefix + padding"
        X = H[:, :t_max]
    else:
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :t_max]
        X = torch.gather(H, 1, order[:, :, None].expand(B, t_max, d))
    X = X.to(dtype)
    if B and int(lengths.min()) < t_max:  # some rows are padded: replace (never multiply) them by zeros
        valid = positions[None, :t_max] < lengths[:, None]
        X = torch.where(valid[:, :, None], X, torch.zeros((), dtype=dtype, device=H.device))
    return X, lengths
