"""latentx.dynamics: hypothesis property tests over random shapes and masks."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentx.dynamics import (
    KoopmanDictionary,
    dsd,
    dsd_reference,
    effective_rank,
    rank_dynamics,
    rank_dynamics_reference,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def padded_batches(draw, max_b: int = 3, max_t: int = 14, max_d: int = 6):
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(0, max_t))
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, T, d, dtype=torch.float64, generator=g).cumsum(dim=1)
    if draw(st.booleans()):
        H = H * 10.0 ** draw(st.integers(-4, 6))
    mask = torch.rand(B, T, generator=g) < draw(st.floats(0.0, 1.0))
    return H, mask


@FAST
@given(padded_batches())
def test_effective_rank_bounds_and_per_sequence(batch) -> None:
    H, mask = batch
    er = effective_rank(H, mask)
    assert er.shape == (H.shape[0],) and torch.isfinite(er).all()
    for b in range(H.shape[0]):
        rows = H[b][mask[b]]
        k = rows.shape[0]
        if k < 2:
            assert er[b].item() == 0.0
            continue
        # The +1e-8 terms of METHODS.md §1 can push ER above the rank r for tiny trajectories: with
        # p_j = σ_j / (S + ε) the entropy is at most log r + δ, δ = ε / (S + ε), so ER <= r·e^δ.
        sigma_sum = torch.linalg.svdvals(rows - rows.mean(0)).sum().item()
        delta = 1e-8 / (sigma_sum + 1e-8)
        assert 1 - 1e-6 <= er[b].item() <= min(k - 1, H.shape[2]) * math.exp(delta) * (1 + 1e-12)
        single = effective_rank(rows[None], torch.ones(1, k, dtype=torch.bool))
        torch.testing.assert_close(er[b : b + 1], single, rtol=1e-10, atol=0)


@FAST
@given(padded_batches(max_t=30), st.integers(1, 5), st.one_of(st.none(), st.integers(1, 20)))
def test_rank_dynamics_matches_reference(batch, stride, window) -> None:
    H, mask = batch
    fast = rank_dynamics(H, mask, stride=stride, window=window)
    ref = rank_dynamics_reference(H, mask, stride=stride, window=window)
    for got, want in zip(fast, ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


@FAST
@given(padded_batches(), st.integers(1, 5), st.sampled_from(["eig", "singular"]))
def test_dsd_matches_reference_and_per_sequence(batch, m, spectrum) -> None:
    H, mask = batch
    dictionary = KoopmanDictionary(H.shape[2], m=m, seed=m)
    Hg = H.clone().requires_grad_(True)
    value = dsd(Hg, mask, dictionary, spectrum=spectrum)
    value.sum().backward()
    assert torch.isfinite(value).all() and (value >= 0).all() and torch.isfinite(Hg.grad).all()
    torch.testing.assert_close(value.detach(), dsd_reference(H, mask, dictionary, spectrum=spectrum), rtol=1e-6, atol=1e-12)
    for b in range(H.shape[0]):
        rows = H[b][mask[b]][None]
        single = dsd(rows, torch.ones(1, rows.shape[1], dtype=torch.bool), dictionary, spectrum=spectrum)
        torch.testing.assert_close(value[b : b + 1].detach(), single.detach(), rtol=1e-9, atol=1e-14)
