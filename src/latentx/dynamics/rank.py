"""Effective rank of hidden-state trajectories, its velocity and acceleration (VERL).

Implements METHODS.md section 1 (VERL, Huang et al. arXiv:2509.23808; effective rank after Roy & Vetterli,
EUSIPCO 2007):

    X~ = X - mean_rows(X);  sigma = singular values of X~
    p_j = sigma_j / (sum(sigma) + 1e-8);  ER(X) = exp(-sum_j p_j log(p_j + 1e-8))     (ER = 0 for k < 2 rows)

Numerics shared by every function here
---------------------------------------
* sigma is read from the eigenvalues of the smaller of the centered Gram X~X~^T (k x k) and the covariance
  X~^T X~ (d x d), centered, formed and solved in **float64** (also for float32 input, whose values are
  exactly representable in float64): sigma = sqrt(max(eig, 0)).
* Each response is divided by c = max|X~| before forming those matrices (so any finite input, e.g. 1e6 or
  1e200 in float64, is safe), and the ``+1e-8`` of the denominator becomes ``1e-8 / c``: the result is
  *identical* to the formula on the raw scale, not an approximation.
* Eigenvalues below 1e-12 * (largest eigenvalue) count as sigma = 0 (they are below what float64 can resolve;
  their total contribution to ER is < 1e-5 relative even in contrived cases).  For them the gradient of
  sqrt is taken as 0, which makes every gradient finite: at rank-deficient points ER is not differentiable
  and this is the minimum-norm choice of subgradient for the sigma = 0 directions.
* Gradients through ``torch.linalg.eigvalsh`` use only eigenvectors (V diag(g) V^T), never eigenvalue
  gaps, so repeated singular values are fine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from latentx.dynamics._validate import check_trajectories, compute_dtype, pack_valid

__all__ = ["RankDynamics", "effective_rank", "rank_dynamics", "rank_dynamics_reference"]

_ER_EPS = 1e-8  # the two +1e-8 terms of METHODS.md section 1
_EIG_REL_FLOOR = 1e-12  # eigenvalues below this fraction of the largest one are treated as sigma = 0


class RankDynamics(NamedTuple):
    """Per-response effective rank and its prefix-series velocity / acceleration, each ``Tensor[B]``."""

    er: Tensor
    erv: Tensor
    era: Tensor


def _er_from_eigenvalues(eigs: Tensor, eps: Tensor | float) -> Tensor:
    """ER from the eigenvalues ``[..., n]`` of a centered Gram / covariance (METHODS.md section 1).

    ``eps`` is the denominator's 1e-8 expressed in the scale of ``eigs`` (1e-8 / c when the data were divided
    by c); broadcastable to ``eigs.shape[:-1]``.
    """
    top = eigs.amax(dim=-1, keepdim=True).clamp_min(0)
    keep = eigs > _EIG_REL_FLOOR * top
    sigma = torch.where(keep, torch.sqrt(torch.where(keep, eigs, torch.ones_like(eigs))), torch.zeros_like(eigs))
    if isinstance(eps, Tensor):
        eps = eps.unsqueeze(-1)
    p = sigma / (sigma.sum(dim=-1, keepdim=True) + eps)
    return torch.exp(-(p * torch.log(p + _ER_EPS)).sum(dim=-1))


def _center_and_scale(X: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Center each response over its valid rows and divide it by c = max|X~| (detached; c = 1 if X~ = 0)."""
    valid = torch.arange(X.shape[1], device=X.device)[None, :] < lengths[:, None]
    mean = X.sum(dim=1, keepdim=True) / lengths.clamp_min(1)[:, None, None].to(X.dtype)
    Xc = torch.where(valid[:, :, None], X - mean, torch.zeros((), dtype=X.dtype, device=X.device))
    scale = Xc.detach().abs().amax(dim=(1, 2)) if X.numel() else torch.ones(X.shape[0], dtype=X.dtype, device=X.device)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return Xc / scale[:, None, None], scale


def _effective_rank_packed(X: Tensor, lengths: Tensor) -> Tensor:
    """ER of packed trajectories ``X: [B, T, d]`` (valid prefix of length ``lengths``, zero padding)."""
    B, T, d = X.shape
    if T < 2:  # zeros that stay attached to the graph, so that .backward() works on any batch
        return X[:, :0].sum(dim=(1, 2))
    Xs, scale = _center_and_scale(X.double(), lengths)  # centering in float64: exact for float32 input
    gram = Xs @ Xs.mT if T <= d else Xs.mT @ Xs  # padded rows are zero: they only add zero eigenvalues
    er = _er_from_eigenvalues(torch.linalg.eigvalsh(gram), _ER_EPS / scale)
    return torch.where(lengths >= 2, er, torch.zeros_like(er)).to(X.dtype)


def effective_rank(H: Tensor, mask: Tensor) -> Tensor:
    """Effective rank ER(H_i) of every response over all its valid tokens (METHODS.md section 1).

    Args:
        H: ``[B, T, d]`` hidden states, any float dtype (computed in float32; float64 if given float64).
        mask: ``[B, T]`` bool, True on real response tokens (anywhere; valid rows are taken in order).

    Returns:
        ``Tensor[B]`` in the compute dtype.  Edge cases: fewer than 2 valid tokens -> 0; a constant
        trajectory (all sigma = 0) -> exactly 1 (p = 0 / (0 + 1e-8) = 0 for every j); rank one -> 1.
        ER is invariant to rotations, permutations and rescaling of the hidden space (up to the 1e-8 terms,
        which are kept exactly as written).  Differentiable w.r.t. ``H``; the gradient is finite everywhere,
        including repeated and zero singular values (see the module docstring).
    """
    H, mask = check_trajectories(H, mask)
    X, lengths = pack_valid(H, mask)
    return _effective_rank_packed(X, lengths)


# ----------------------------------------------------------------------------------------------------------
# Prefix series, velocity, acceleration
# ----------------------------------------------------------------------------------------------------------


def _check_stride_window(stride: int, window: int | None) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")


def _velocity_acceleration(m: Tensor, n_windows: Tensor) -> tuple[Tensor, Tensor]:
    """ERV, ERA from the prefix series ``m: [B, K_max]`` (m[:, k-1] = m_k) with ``n_windows[b]`` = K_b terms.

    d_k = m_k - mean(m_1..m_{k-1}) (k >= 2);  a_k = d_k - d_{k-1} (k >= 3);  ERV = mean d_k, ERA = mean a_k,
    0 where no term exists.  Entries of ``m`` past K_b are ignored.
    """
    B, k_max = m.shape
    zeros = m.new_zeros(B)
    if k_max < 2:
        return zeros, zeros
    k = torch.arange(1, k_max + 1, device=m.device)
    live = k[None, :] <= n_windows[:, None]
    m = torch.where(live, m, torch.zeros_like(m))
    prev_mean = torch.cumsum(m, dim=1)[:, :-1] / k[:-1].to(m.dtype)  # mean(m_1..m_{k-1}) for k = 2..K_max
    d = m[:, 1:] - prev_mean  # d_k, k = 2..K_max
    d_live = live[:, 1:]
    n_d = d_live.sum(dim=1)
    erv = torch.where(d_live, d, torch.zeros_like(d)).sum(dim=1) / n_d.clamp_min(1).to(m.dtype)
    a = d[:, 1:] - d[:, :-1]  # a_k, k = 3..K_max
    a_live = live[:, 2:]
    n_a = a_live.sum(dim=1)
    era = torch.where(a_live, a, torch.zeros_like(a)).sum(dim=1) / n_a.clamp_min(1).to(m.dtype)
    return torch.where(n_d > 0, erv, zeros), torch.where(n_a > 0, era, zeros)


def _tail(X: Tensor, lengths: Tensor, window: int | None) -> tuple[Tensor, Tensor]:
    """The last ``window`` valid rows of each packed response, moved to the front (zero padded)."""
    if window is None:
        return X, lengths
    tail_len = lengths.clamp(max=window)
    t_tail = int(tail_len.max()) if X.shape[0] else 0
    pos = torch.arange(t_tail, device=X.device)
    index = ((lengths - tail_len)[:, None] + pos[None, :]).clamp(max=max(X.shape[1] - 1, 0))
    Xt = torch.gather(X, 1, index[:, :, None].expand(-1, -1, X.shape[2]))
    valid = pos[None, :] < tail_len[:, None]
    return torch.where(valid[:, :, None], Xt, torch.zeros((), dtype=X.dtype, device=X.device)), tail_len


def _prefix_effective_ranks(X: Tensor, lengths: Tensor, stride: int, n_windows: Tensor) -> Tensor:
    """m[b, k-1] = ER(X[b, : k*stride + 1]) for k = 1..K_max, without redoing each window from scratch.

    The centered Gram of prefix n is P_n G[:n, :n] P_n (P_n the centering projector, G = XX^T computed once),
    so for windows with n <= d we cut blocks out of one Gram matrix and center them with row sums.  For
    n > d we keep running sums S_n = sum x x^T and u_n = sum x (each new row is added once) and use the
    covariance S_n - u_n u_n^T / n.  Every response is shifted by its own mean and divided by c = max|.|
    first (exact, see the module docstring), and all of this is float64.  Eigen-solves are batched over
    responses; only responses that have window k take part in step k.
    """
    B, T, d = X.shape
    k_max = int(n_windows.max()) if B else 0
    m = torch.zeros(B, k_max, dtype=torch.float64, device=X.device)
    if k_max == 0:
        return m
    Xs, scale = _center_and_scale(X.double(), lengths)  # a shift by the full mean: exact for every prefix
    eps = _ER_EPS / scale
    sizes = [k * stride + 1 for k in range(1, k_max + 1)]
    n_gram = max([n for n in sizes if n <= d], default=0)
    gram = Xs[:, :n_gram] @ Xs[:, :n_gram].mT if n_gram else None
    cov_sum = cov_u = None
    cov_rows = 0
    for k, n in enumerate(sizes, start=1):
        active = torch.nonzero(n_windows >= k).flatten()
        if n <= d:
            block = gram[active, :n, :n]
            rows = block.sum(dim=-1)
            total = rows.sum(dim=-1)
            centered = block - (rows[:, :, None] + rows[:, None, :]) / n + (total / (n * n))[:, None, None]
        else:
            if cov_sum is None:
                cov_sum = Xs.new_zeros(B, d, d)
                cov_u = Xs.new_zeros(B, d)
            new_rows = Xs[:, cov_rows:n]
            cov_sum = cov_sum + new_rows.mT @ new_rows
            cov_u = cov_u + new_rows.sum(dim=1)
            cov_rows = n
            centered = cov_sum[active] - cov_u[active, :, None] * cov_u[active, None, :] / n
        eigs = torch.linalg.eigvalsh(centered)
        m[active, k - 1] = _er_from_eigenvalues(eigs, eps[active])
    return m


def rank_dynamics(H: Tensor, mask: Tensor, stride: int = 40, window: int | None = 512) -> RankDynamics:
    """ER over the whole response plus ERV and ERA of its prefix series (METHODS.md section 1).

    Keeps the last ``window`` valid tokens (``window=None``: no tail cap), T' = their number; if
    T' < 2*stride, ERV = ERA = 0.  Otherwise m_k = ER(H'[: k*stride + 1]) for k*stride < T',
    d_k = m_k - mean(m_1..m_{k-1}) (k >= 2), a_k = d_k - d_{k-1} (k >= 3), ERV = mean d_k, ERA = mean a_k
    (0 where no term exists).  ``er`` is :func:`effective_rank` over all valid tokens (not only the tail).

    Gives the numbers of :func:`rank_dynamics_reference` (per-window SVD) to ~1e-6 relative, but builds
    every window's eigenproblem incrementally from one Gram matrix / running covariance sums and solves
    the smaller of the k x k Gram and d x d covariance problems in float64, batched over responses.

    Returns detached values (VERL shapes advantages with them; use :func:`effective_rank` for gradients),
    in the compute dtype (float32, or float64 for float64 input).
    """
    _check_stride_window(stride, window)
    H, mask = check_trajectories(H, mask)
    with torch.no_grad():
        X, lengths = pack_valid(H, mask)
        er = _effective_rank_packed(X, lengths)
        Xt, tail_len = _tail(X, lengths, window)
        n_windows = torch.where(tail_len >= 2 * stride, (tail_len - 1) // stride, torch.zeros_like(tail_len))
        m = _prefix_effective_ranks(Xt, tail_len, stride, n_windows)
        erv, era = _velocity_acceleration(m, n_windows)
    dtype = compute_dtype(H.dtype)
    return RankDynamics(er.to(dtype), erv.to(dtype), era.to(dtype))


# ----------------------------------------------------------------------------------------------------------
# Straightforward reference (tests and benchmark only)
# ----------------------------------------------------------------------------------------------------------


def _er_svd(X: Tensor) -> Tensor:
    """ER of one unpadded trajectory by SVD of the centered rows, exactly as METHODS.md section 1 reads."""
    if X.shape[0] < 2:
        return X.new_zeros(())
    sigma = torch.linalg.svdvals(X - X.mean(dim=0, keepdim=True))
    p = sigma / (sigma.sum() + _ER_EPS)
    return torch.exp(-(p * torch.log(p + _ER_EPS)).sum())


def rank_dynamics_reference(H: Tensor, mask: Tensor, stride: int = 40, window: int | None = 512) -> RankDynamics:
    """The reference algorithm: a Python loop over responses and windows, one SVD per prefix window.

    Same contract and outputs as :func:`rank_dynamics` (METHODS.md section 1); O(T'^4 / stride) per response.
    Computes in the compute dtype (float32, or float64 for float64 input) with ``torch.linalg.svdvals``.
    """
    _check_stride_window(stride, window)
    H, mask = check_trajectories(H, mask)
    dtype = compute_dtype(H.dtype)
    out = torch.zeros(3, H.shape[0], dtype=dtype, device=H.device)
    with torch.no_grad():
        for b in range(H.shape[0]):
            rows = H[b][mask[b]].to(dtype)
            out[0, b] = _er_svd(rows)
            tail = rows if window is None else rows[-window:]
            if tail.shape[0] < 2 * stride:
                continue
            ms = [_er_svd(tail[: t + 1]) for t in range(stride, tail.shape[0], stride)]
            ds = [ms[k] - torch.stack(ms[:k]).mean() for k in range(1, len(ms))]
            accs = [ds[k] - ds[k - 1] for k in range(1, len(ds))]
            out[1, b] = torch.stack(ds).mean() if ds else 0.0
            out[2, b] = torch.stack(accs).mean() if accs else 0.0
    return RankDynamics(out[0], out[1], out[2])
