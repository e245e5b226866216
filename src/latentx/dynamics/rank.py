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
* float32 / bf16 values are exact in float64 and their squares can neither overflow nor underflow there.  A
  float64 response with max|X~| outside [1e-100, 1e100] is divided by c = max|X~| first and the ``+1e-8``
  of the denominator becomes ``1e-8 / c``: the result is *identical* to the formula on the raw scale.
* Eigenvalues within the eigen-solver's float64 rounding noise, |eig| <= n * eps64 * (largest eigenvalue)
  for an n x n problem, count as sigma = 0: they are sigma <= sqrt(n * eps64) * sigma_max (< 1e-6 sigma_max
  for n <= 4096), numerically indistinguishable from 0.  For them the gradient of sqrt is taken as 0,
  which makes every gradient finite: at rank-deficient points ER is not differentiable and this is the
  minimum-norm choice of subgradient for the sigma = 0 directions.
* Gradients through ``torch.linalg.eigvalsh`` use only eigenvectors (V diag(g) V^T), never eigenvalue
  gaps, so repeated singular values are fine.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from latentx.dynamics._validate import check_trajectories, compute_dtype, pack_valid
from latentx.dynamics.koopman import _to_compute

__all__ = ["RankDynamics", "effective_rank", "rank_dynamics", "rank_dynamics_reference"]

_ER_EPS = 1e-8  # the two +1e-8 terms of METHODS.md section 1
_FLOAT64_EPS = torch.finfo(torch.float64).eps


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
    keep = eigs > eigs.shape[-1] * _FLOAT64_EPS * top  # above the solver's rounding noise
    sigma = torch.where(keep, torch.sqrt(torch.where(keep, eigs, torch.ones_like(eigs))), torch.zeros_like(eigs))
    if isinstance(eps, Tensor):
        eps = eps.unsqueeze(-1)
    p = sigma / (sigma.sum(dim=-1, keepdim=True) + eps)
    return torch.exp(-(p * torch.log(p + _ER_EPS)).sum(dim=-1))


_SAFE_SCALE = (1e-100, 1e100)  # float64 squares stay normal inside this range


def _center(X: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """float64 rows of each response minus their mean (padded rows zero), and the ER ``eps`` per response.

    float32 / bf16 / f16 values are exact in float64 and their squares cannot overflow or underflow there.
    A float64 response with max|X~| outside [1e-100, 1e100] is divided by c = max|X~| (detached) and its eps
    becomes 1e-8 / c, which leaves ER exactly as written on the raw scale.
    """
    Xd = X.double()
    valid = torch.arange(X.shape[1], device=X.device)[None, :] < lengths[:, None]
    pre = torch.ones(X.shape[0], dtype=torch.float64, device=X.device)
    if X.dtype == torch.float64 and X.numel():
        # Rows near the float64 limit (1.8e308) overflow their own sum and the centered values: divide such a
        # response by a power of two first (exact), folded into c below (found by tests/test_dynamics_degenerate.py).
        raw_top = Xd.detach().abs().amax(dim=(1, 2))
        big = raw_top > _SAFE_SCALE[1]
        if bool(big.any()):
            power = torch.ldexp(torch.ones_like(raw_top), torch.frexp(raw_top).exponent - 1)  # <= raw_top
            pre = torch.where(big, power, pre)
            Xd = Xd / pre[:, None, None]
    mean = Xd.sum(dim=1, keepdim=True) / lengths.clamp_min(1)[:, None, None].to(torch.float64)
    Xc = Xd - mean
    if X.shape[0] and int(lengths.min()) < X.shape[1]:
        Xc = Xc.masked_fill(~valid[:, :, None], 0.0)
    scale = torch.ones(X.shape[0], dtype=torch.float64, device=X.device)
    if X.dtype == torch.float64 and X.numel():
        top = torch.maximum(Xc.detach().amax(dim=(1, 2)), -Xc.detach().amin(dim=(1, 2)))
        rescale = (top > 0) & ((top < _SAFE_SCALE[0]) | (top > _SAFE_SCALE[1]))
        if bool(rescale.any()):
            scale = torch.where(rescale, top, scale)
            Xc = Xc / scale[:, None, None]
    return Xc, _ER_EPS / (scale * pre)


def _effective_rank_packed(X: Tensor, lengths: Tensor) -> Tensor:
    """ER of packed trajectories ``X: [B, T, d]`` (valid prefix of length ``lengths``, zero padding)."""
    if X.shape[1] < 2:  # zeros that stay attached to the graph, so that .backward() works on any batch
        return X[:, :0].sum(dim=(1, 2))
    Xc, eps = _center(X, lengths)
    return _effective_rank_centered(Xc, eps, lengths, None).to(X.dtype)


def _effective_rank_centered(Xc: Tensor, eps: Tensor, lengths: Tensor, gram: Tensor | None) -> Tensor:
    """ER from centered float64 rows; ``gram`` = Xc Xc^T when the caller already has it (T <= d)."""
    B, T, d = Xc.shape
    if gram is None:
        gram = Xc @ Xc.mT if T <= d else Xc.mT @ Xc  # zero padded rows add nothing to the covariance
    if T <= d and int(lengths.min()) < T:
        # Padded rows/columns of the Gram are exactly zero (a decoupled block).  Put -1 on their diagonal so
        # that block's eigenvalues are exactly -1 (dropped as sigma = 0) instead of rounding noise near 0.
        padded = torch.arange(T, device=Xc.device)[None, :] >= lengths[:, None]
        gram = gram - torch.diag_embed(padded.to(gram.dtype))
    er = _er_from_eigenvalues(torch.linalg.eigvalsh(gram), eps)
    return torch.where(lengths >= 2, er, torch.zeros_like(er))


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
    # The guarded cast keeps the gradient finite in H's dtype (e.g. float16 at tiny scales; see koopman.py).
    X, lengths = pack_valid(_to_compute(H), mask)
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


def _prefix_effective_ranks(
    Xc: Tensor, eps: Tensor, stride: int, n_windows: Tensor, gram: Tensor | None = None
) -> Tensor:
    """m[b, k-1] = ER(X[b, : k*stride + 1]) for k = 1..K_max, without redoing each window from scratch.

    ``Xc``: float64 rows shifted by any per-response vector (each window is re-centered exactly below),
    padded rows zero.  The centered Gram of prefix n is P_n G[:n, :n] P_n (P_n the centering projector,
    G = Xc Xc^T computed once, or passed in as ``gram``), so windows with n <= d are blocks of one Gram
    matrix centered with row sums.  For n > d we keep running sums S_n = sum x x^T and u_n = sum x (each
    new row is added once) and use the covariance S_n - u_n u_n^T / n.  Eigen-solves are batched over the
    responses that have window k.
    """
    B, T, d = Xc.shape
    k_max = int(n_windows.max()) if B else 0
    m = torch.zeros(B, k_max, dtype=torch.float64, device=Xc.device)
    sizes = [k * stride + 1 for k in range(1, k_max + 1)]
    n_gram = max([n for n in sizes if n <= d], default=0)
    if n_gram and (gram is None or gram.shape[-1] < n_gram):
        gram = Xc[:, :n_gram] @ Xc[:, :n_gram].mT
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
                cov_sum = Xc.new_zeros(B, d, d)
                cov_u = Xc.new_zeros(B, d)
            new_rows = Xc[:, cov_rows:n]
            cov_sum = cov_sum + new_rows.mT @ new_rows
            cov_u = cov_u + new_rows.sum(dim=1)
            cov_rows = n
            centered = cov_sum[active] - cov_u[active, :, None] * cov_u[active, None, :] / n
        eigs = torch.linalg.eigvalsh(centered)
        if n <= d:
            # The centered Gram has the exact null vector 1; its computed eigenvalue is cancellation noise of
            # the uncentered block, so it is set to the exact 0 (it is the smallest, eigvalsh sorts ascending).
            eigs[:, 0] = 0.0
        m[active, k - 1] = _er_from_eigenvalues(eigs, eps[active])
    return m


def rank_dynamics(H: Tensor, mask: Tensor, stride: int = 40, window: int | None = 512) -> RankDynamics:
    """ER over the whole response plus ERV and ERA of its prefix series (METHODS.md section 1).

    Keeps the last ``window`` valid tokens (``window=None``: no tail cap), T' = their number; if
    T' < 2*stride, ERV = ERA = 0.  Otherwise m_k = ER(H'[: k*stride + 1]) for k*stride < T',
    d_k = m_k - mean(m_1..m_{k-1}) (k >= 2), a_k = d_k - d_{k-1} (k >= 3), ERV = mean d_k, ERA = mean a_k
    (0 where no term exists).  ``er`` is :func:`effective_rank` over all valid tokens (not only the tail).

    Gives the numbers of :func:`rank_dynamics_reference` (per-window SVD): ~1e-14 relative for float64
    input, within the reference's own float32 round-off (~1e-6) for float32 input.  Instead of one SVD of
    each n x d window it builds every window's eigenproblem incrementally (blocks of one Gram matrix for
    n <= d, running covariance sums for n > d) and solves the smaller of the n x n and d x d problems in
    float64, batched over responses.  Cost per window: one min(n, d)^3 symmetric eigen-solve.

    Returns detached values (VERL shapes advantages with them; use :func:`effective_rank` for gradients),
    in the compute dtype (float32, or float64 for float64 input).
    """
    _check_stride_window(stride, window)
    H, mask = check_trajectories(H, mask)
    with torch.no_grad():
        X, lengths = pack_valid(H, mask)
        B, T, d = X.shape
        if T < 2:
            zeros = X.new_zeros(B)
            return RankDynamics(zeros, zeros, zeros)
        Xc, eps = _center(X, lengths)
        gram = Xc @ Xc.mT if T <= d else None
        er = _effective_rank_centered(Xc, eps, lengths, gram)
        if window is None or T <= window:  # the tail is the whole response: reuse its centered rows and Gram
            tail_len = lengths
        else:
            Xt, tail_len = _tail(X, lengths, window)
            Xc, eps = _center(Xt, tail_len)
            gram = None
        n_windows = torch.where(tail_len >= 2 * stride, (tail_len - 1) // stride, torch.zeros_like(tail_len))
        m = _prefix_effective_ranks(Xc, eps, stride, n_windows, gram)
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
    # Values near the dtype's limit overflow X - mean: divide by a power of two c first (exact) and use
    # 1e-8 / c in the denominator, which is the formula on the raw scale.
    top = float(X.detach().abs().max())
    if top > 2.0**60:  # in float64, where 1e-8 / c is still a normal number
        c = math.ldexp(1.0, math.frexp(top)[1] - 1)  # a power of two <= top: finite
        Xs = X.double() / c
        sigma = torch.linalg.svdvals(Xs - Xs.mean(dim=0, keepdim=True))
        p = sigma / (sigma.sum() + _ER_EPS / c)
        return torch.exp(-(p * torch.log(p + _ER_EPS)).sum()).to(X.dtype)
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
