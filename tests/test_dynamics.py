"""latentx.dynamics: effective rank and rank dynamics (METHODS.md section 1), validation helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from latentx.dynamics import effective_rank, pack_valid, rank_dynamics, rank_dynamics_reference
from latentx.dynamics.rank import _velocity_acceleration


def exact_er(sigmas: list[float]) -> float:
    """METHODS.md section 1 evaluated on given singular values, in Python floats."""
    total = sum(sigmas)
    ps = [s / (total + 1e-8) for s in sigmas]
    return math.exp(-sum(p * math.log(p + 1e-8) for p in ps))


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def full_mask(B: int, T: int) -> torch.Tensor:
    return torch.ones(B, T, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------------
# closed forms
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 7, 20])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 250.0])
def test_effective_rank_of_simplex_closed_form(k: int, scale: float) -> None:
    # Rows a*e_i + offset: the centered matrix a(I - 11^T/k) has k-1 singular values a and one 0.
    d = 24
    H = torch.zeros(1, k, d, dtype=torch.float64)
    H[0, :, :k] = scale * torch.eye(k, dtype=torch.float64)
    H[0] += torch.linspace(-3, 5, d, dtype=torch.float64)
    expected = exact_er([scale] * (k - 1) + [0.0])
    assert effective_rank(H, full_mask(1, k)).item() == pytest.approx(expected, rel=1e-10)
    # float32 input: exact computation on the rounded input (the offset's rounding is part of the input)
    H32 = H.float()
    assert effective_rank(H32, full_mask(1, k)).item() == pytest.approx(
        effective_rank(H32.double(), full_mask(1, k)).item(), rel=1e-6
    )


def test_effective_rank_of_known_singular_values() -> None:
    # X~ = U diag(s) V^T with centered U (columns orthogonal to 1): singular values are exactly s.
    g = torch.Generator().manual_seed(0)
    k, d, s = 9, 6, [5.0, 3.0, 2.0, 0.5, 0.1]
    basis = torch.linalg.qr(torch.cat([torch.ones(k, 1), torch.randn(k, 5, generator=g)], dim=1).double())[0]
    U = basis[:, 1:6]
    V = random_orthogonal(d, g)[:, :5]
    H = (U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T + 4.0)[None]
    assert effective_rank(H, full_mask(1, k)).item() == pytest.approx(exact_er(s), rel=1e-10)


def test_effective_rank_is_one_for_rank_one_and_constant_trajectories() -> None:
    t = torch.linspace(-2, 3, 11, dtype=torch.float64)
    direction = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rank_one = (t[:, None] * direction + 7.0)[None]
    constant = torch.full((1, 11, 16), 3.5, dtype=torch.float64)
    assert effective_rank(rank_one, full_mask(1, 11)).item() == pytest.approx(1.0, abs=1e-7)
    # all sigma = 0: p = 0 / (0 + 1e-8) = 0 and ER = exp(0) = 1, exactly as the formula is written
    assert effective_rank(constant, full_mask(1, 11)).item() == 1.0


@pytest.mark.parametrize("noise", [1e-4, 1e-6])
def test_nearly_rank_one_trajectories_keep_their_small_singular_values(noise: float) -> None:
    # Tiny singular values still count: 40 modes at ~3e-7 sigma_max move ER by 1.5e-4, so dropping them
    # would fail here.  The float64 Gram resolves them to a few percent (ER to ~5e-6): hence rel=2e-5.
    g = torch.Generator().manual_seed(21)
    t = torch.linspace(-1, 1, 60, dtype=torch.float64)
    H = (t[:, None] * torch.randn(40, dtype=torch.float64, generator=g) + noise * torch.randn(60, 40, dtype=torch.float64, generator=g))[None]
    expected = exact_er(torch.linalg.svdvals(H[0] - H[0].mean(dim=0)).tolist())
    assert expected > 1 + 1e-5
    assert effective_rank(H, full_mask(1, 60)).item() == pytest.approx(expected, rel=2e-5)
    fast = rank_dynamics(H, full_mask(1, 60), stride=10, window=None)
    ref = rank_dynamics_reference(H, full_mask(1, 60), stride=10, window=None)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_effective_rank_is_zero_below_two_tokens() -> None:
    H = torch.randn(3, 4, 5)
    mask = torch.tensor([[False] * 4, [False, True, False, False], [True, True, False, False]])
    er = effective_rank(H, mask)
    assert er[0].item() == 0.0 and er[1].item() == 0.0
    assert er[2].item() == pytest.approx(1.0, abs=1e-6)  # two distinct points: rank one


# ---------------------------------------------------------------------------------------------------------
# invariances, dtypes, scales
# ---------------------------------------------------------------------------------------------------------


def test_effective_rank_invariances() -> None:
    g = torch.Generator().manual_seed(2)
    H = torch.randn(3, 30, 12, dtype=torch.float64, generator=g).cumsum(dim=1)
    mask = full_mask(3, 30)
    er = effective_rank(H, mask)
    Q = random_orthogonal(12, g)
    perm = torch.randperm(12, generator=g)
    torch.testing.assert_close(effective_rank(H @ Q, mask), er, rtol=1e-10, atol=0)
    torch.testing.assert_close(effective_rank(H[:, :, perm], mask), er, rtol=1e-10, atol=0)
    torch.testing.assert_close(effective_rank(7.3 * H - 2.0, mask), er, rtol=1e-9, atol=0)


def test_effective_rank_huge_and_tiny_values_are_finite_and_scale_free() -> None:
    g = torch.Generator().manual_seed(3)
    H = torch.randn(2, 25, 10, generator=g)
    mask = full_mask(2, 25)
    er = effective_rank(H, mask)
    for scale in (1e4, 1e6, 1e30):
        torch.testing.assert_close(effective_rank(H * scale, mask), er, rtol=1e-5, atol=0)
    H64 = H.double()
    torch.testing.assert_close(effective_rank(H64 * 1e200, mask), effective_rank(H64, mask), rtol=1e-8, atol=0)
    assert torch.isfinite(effective_rank(H64 * 1e-200, mask)).all()


def test_effective_rank_bf16_and_dtypes() -> None:
    H = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(4))
    mask = full_mask(2, 20)
    out = effective_rank(H.bfloat16(), mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, effective_rank(H.bfloat16().float(), mask))
    assert effective_rank(H.half(), mask).dtype == torch.float32
    assert effective_rank(H.double(), mask).dtype == torch.float64
    assert rank_dynamics(H.bfloat16(), mask, stride=3).er.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# masks and padding
# ---------------------------------------------------------------------------------------------------------


def random_batch(seed: int, B: int = 5, T: int = 40, d: int = 7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, T, d, dtype=dtype, generator=g).cumsum(dim=1)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0] = True
    mask[1, 30:] = False  # right padding
    mask[2, :6] = False  # left padding
    mask[3] = False
    mask[3, 5] = True  # single token
    return H, mask


def test_padded_batch_equals_per_sequence() -> None:
    H, mask = random_batch(5)
    H[~mask] = float("nan")  # garbage in padding must never leak
    er = effective_rank(H, mask)
    dyn = rank_dynamics(H, mask, stride=4, window=25)
    for b in range(H.shape[0]):
        rows = H[b][mask[b]][None]
        one = torch.ones(1, rows.shape[1], dtype=torch.bool)
        torch.testing.assert_close(er[b : b + 1], effective_rank(rows, one), rtol=1e-12, atol=0)
        single = rank_dynamics(rows, one, stride=4, window=25)
        for got, want in zip(dyn, single):
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-10, atol=1e-12)


def test_pack_valid_keeps_order_and_accepts_integer_masks() -> None:
    H = torch.arange(12.0).reshape(1, 6, 2)
    mask = torch.tensor([[0, 1, 0, 1, 1, 0]])
    X, lengths = pack_valid(H, mask.bool())
    assert lengths.tolist() == [3]
    assert X[0].tolist() == [[2.0, 3.0], [6.0, 7.0], [8.0, 9.0]]
    torch.testing.assert_close(effective_rank(H, mask), effective_rank(H, mask.bool()))


# ---------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------


def test_effective_rank_gradcheck() -> None:
    H, mask = random_batch(6, B=4, T=9, d=5)
    assert gradcheck(lambda h: effective_rank(h, mask), (H.clone().requires_grad_(True),))
    wide = torch.randn(2, 6, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert gradcheck(lambda h: effective_rank(h, full_mask(2, 6)), (wide.requires_grad_(True),))


def test_effective_rank_gradients_finite_on_degenerate_inputs() -> None:
    t = torch.linspace(0, 1, 8, dtype=torch.float64)
    cases = {
        "constant": torch.ones(1, 8, 4, dtype=torch.float64),
        "rank_one": (t[:, None] * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))[None],
        "repeated_sigma": torch.cat([torch.eye(4, dtype=torch.float64), -torch.eye(4, dtype=torch.float64)])[None],
        "duplicated_rows": torch.randn(1, 4, 4, dtype=torch.float64).repeat(1, 2, 1),
        "huge": 1e6 * torch.randn(1, 8, 4, dtype=torch.float64),
    }
    for name, H in cases.items():
        for mask in (full_mask(1, 8), torch.tensor([[True, False] + [False] * 6]), torch.tensor([[True, True] + [False] * 6])):
            Hg = H.clone().requires_grad_(True)
            effective_rank(Hg, mask).sum().backward()
            assert torch.isfinite(Hg.grad).all(), name
    bf = torch.randn(2, 8, 4).bfloat16().requires_grad_(True)
    effective_rank(bf, full_mask(2, 8)).sum().backward()
    assert torch.isfinite(bf.grad.float()).all()


# ---------------------------------------------------------------------------------------------------------
# rank dynamics
# ---------------------------------------------------------------------------------------------------------


def test_velocity_acceleration_closed_form() -> None:
    m = torch.tensor([[1.0, 2.0, 4.0, 0.0], [5.0, 3.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    erv, era = _velocity_acceleration(m, torch.tensor([3, 2, 1]))
    # d_2 = 2 - 1 = 1, d_3 = 4 - 1.5 = 2.5 -> ERV = 1.75; a_3 = 1.5 -> ERA = 1.5
    assert erv.tolist() == [1.75, -2.0, 0.0]
    assert era.tolist() == [1.5, 0.0, 0.0]


@pytest.mark.parametrize(
    "T,d,stride,window",
    [
        (120, 40, 10, None),  # Gram windows then covariance windows
        (120, 200, 10, 512),  # Gram windows only
        (90, 8, 7, 50),  # covariance only, tail cap active
        (300, 64, 40, 512),  # the defaults
        (79, 16, 40, None),  # T' < 2s: ERV = ERA = 0
        (80, 16, 40, None),  # T' = 2s: one window, still no velocity
    ],
)
def test_rank_dynamics_matches_reference(T: int, d: int, stride: int, window: int | None) -> None:
    g = torch.Generator().manual_seed(T + d)
    H = torch.randn(3, T, d, dtype=torch.float64, generator=g).cumsum(dim=1) + torch.randn(3, T, d, dtype=torch.float64, generator=g)
    mask = full_mask(3, T)
    mask[1, T - T // 3 :] = False
    fast = rank_dynamics(H, mask, stride=stride, window=window)
    ref = rank_dynamics_reference(H, mask, stride=stride, window=window)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    if T < 2 * stride + 1:
        assert (fast.erv == 0).all() and (fast.era == 0).all()
    # float32 input: same numbers to 1e-4 relative (ERV / ERA against the ER scale, they can be ~0)
    fast32 = rank_dynamics(H.float(), mask, stride=stride, window=window)
    scale = ref.er.abs().max().item()
    torch.testing.assert_close(fast32.er.double(), ref.er, rtol=1e-4, atol=0)
    torch.testing.assert_close(fast32.erv.double(), ref.erv, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(fast32.era.double(), ref.era, rtol=1e-4, atol=1e-4 * scale)


def test_rank_dynamics_long_float32_matches_reference() -> None:
    g = torch.Generator().manual_seed(11)
    T, d = 700, 48
    H = torch.randn(2, T, d, generator=g).cumsum(dim=1) / 10 + torch.randn(2, T, d, generator=g)
    H[:, :, 0] += 300.0  # a large "massive activation" offset
    mask = full_mask(2, T)
    mask[0, 650:] = False
    fast = rank_dynamics(H, mask, stride=20, window=None)
    ref = rank_dynamics_reference(H.double(), mask, stride=20, window=None)
    ref32 = rank_dynamics_reference(H, mask, stride=20, window=None)
    scale = ref.er.abs().max().item()
    for got, want, want32 in zip(fast, ref, ref32):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(got, want32, rtol=1e-4, atol=1e-4 * scale)


def test_rank_dynamics_er_equals_effective_rank_over_whole_response() -> None:
    H, mask = random_batch(12, T=60)
    torch.testing.assert_close(rank_dynamics(H, mask, stride=5, window=20).er, effective_rank(H, mask))


def test_rank_dynamics_tail_window_uses_last_tokens() -> None:
    g = torch.Generator().manual_seed(13)
    H = torch.randn(1, 100, 6, dtype=torch.float64, generator=g).cumsum(dim=1)
    tail = rank_dynamics(H[:, -30:], full_mask(1, 30), stride=5, window=None)
    capped = rank_dynamics(H, full_mask(1, 100), stride=5, window=30)
    torch.testing.assert_close(capped.erv, tail.erv)
    torch.testing.assert_close(capped.era, tail.era)
    assert capped.erv.item() != 0.0


def test_rank_dynamics_detached_and_finite_on_degenerate_inputs() -> None:
    H = torch.ones(2, 50, 5, requires_grad=True)
    out = rank_dynamics(H, full_mask(2, 50), stride=5)
    assert not out.er.requires_grad
    assert out.er.tolist() == [1.0, 1.0] and out.erv.tolist() == [0.0, 0.0]
    huge = rank_dynamics(1e6 * torch.randn(2, 50, 5), full_mask(2, 50), stride=5)
    assert all(torch.isfinite(x).all() for x in huge)


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------


def test_non_finite_values_name_the_response() -> None:
    H = torch.randn(4, 6, 3)
    mask = full_mask(4, 6)
    mask[1, 4:] = False
    H[1, 5, 0] = float("nan")  # padding: fine
    effective_rank(H, mask)
    H[2, 3, 1] = float("inf")
    for fn in (effective_rank, rank_dynamics, rank_dynamics_reference):
        with pytest.raises(ValueError, match="response 2"):
            fn(H, mask)


def test_bad_arguments_name_the_argument() -> None:
    H = torch.randn(2, 5, 3)
    mask = full_mask(2, 5)
    with pytest.raises(ValueError, match="mask"):
        effective_rank(H, mask[:, :4])
    with pytest.raises(ValueError, match="mask"):
        effective_rank(H, mask.float())
    with pytest.raises(ValueError, match="mask"):
        effective_rank(H, torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="mask"):
        effective_rank(H, mask.to("meta"))
    with pytest.raises(ValueError, match="H"):
        effective_rank(H[0], mask)
    with pytest.raises(ValueError, match="H"):
        effective_rank(H.long(), mask)
    with pytest.raises(ValueError, match="H"):
        effective_rank(H.numpy(), mask)
    with pytest.raises(ValueError, match="stride"):
        rank_dynamics(H, mask, stride=0)
    with pytest.raises(ValueError, match="window"):
        rank_dynamics(H, mask, window=0)


def test_empty_batches() -> None:
    assert effective_rank(torch.zeros(0, 5, 3), torch.zeros(0, 5, dtype=torch.bool)).shape == (0,)
    assert effective_rank(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool)).tolist() == [0.0, 0.0]
    out = rank_dynamics(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool))
    assert out.erv.tolist() == [0.0, 0.0]
