"""latentx.dynamics: Koopman dictionary, EDMD, spectrum, DSD (METHODS.md section 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from latentx.dynamics import (
    KoopmanDictionary,
    dsd,
    dsd_reference,
    dsd_with_info,
    edmd,
    koopman_operator,
    koopman_spectrum,
)
from latentx.dynamics.koopman import _EigenvalueModuli


def full_mask(B: int, T: int) -> torch.Tensor:
    return torch.ones(B, T, dtype=torch.bool)


def random_walk(B: int, T: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, d, generator=g).cumsum(dim=1) / 3 + torch.randn(B, T, d, generator=g)).to(dtype)


def linear_system(A: torch.Tensor, x0: torch.Tensor, T: int) -> torch.Tensor:
    rows = [x0]
    for _ in range(T - 1):
        rows.append(A @ rows[-1])
    return torch.stack(rows)


def sorted_complex(values) -> np.ndarray:
    values = np.asarray(values)
    return values[np.lexsort((values.imag, values.real))]


# A nonnegative matrix with row sums < 1 keeps z_t = A^t z_0 inside (0, 1)^3, and has distinct eigenvalues.
A_POSITIVE = torch.tensor([[0.55, 0.25, 0.05], [0.10, 0.60, 0.20], [0.30, 0.05, 0.45]], dtype=torch.float64)


def identity_dictionary(d: int) -> KoopmanDictionary:
    dictionary = KoopmanDictionary(d, m=d)
    with torch.no_grad():
        dictionary.weight.copy_(torch.eye(d))
    return dictionary


def logit_trajectory(T: int = 40) -> torch.Tensor:
    """Hidden states h_t = logit(z_t) with z_{t+1} = A z_t: under g = sigmoid(I h) the lift is exactly linear."""
    z = linear_system(A_POSITIVE, torch.tensor([0.7, 0.2, 0.5], dtype=torch.float64), T)
    return torch.logit(z)[None]


# ---------------------------------------------------------------------------------------------------------
# EDMD
# ---------------------------------------------------------------------------------------------------------


def test_edmd_recovers_a_known_linear_system() -> None:
    # x_{t+1} = A x_t with rows as snapshots: Psi_Y = Psi_X A^T, so K = A^T and eig(K) = eig(A).
    g = torch.Generator().manual_seed(0)
    radii, angles = torch.tensor([0.97, 0.9, 0.8]), torch.tensor([0.3, 1.1, 2.0])
    blocks = [torch.tensor([[r * torch.cos(a), -r * torch.sin(a)], [r * torch.sin(a), r * torch.cos(a)]]) for r, a in zip(radii, angles)]
    A = torch.block_diag(*blocks, torch.tensor([[0.5]]), torch.tensor([[-0.6]])).double()
    P = torch.randn(8, 8, dtype=torch.float64, generator=g)
    A = P @ A @ torch.linalg.inv(P)
    X = linear_system(A, torch.randn(8, dtype=torch.float64, generator=g), 60)
    K = edmd(X[None, :-1], X[None, 1:], full_mask(1, 59), ridge=1e-13)
    torch.testing.assert_close(K[0], A.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        sorted_complex(torch.linalg.eigvals(K[0]).numpy()), sorted_complex(torch.linalg.eigvals(A).numpy()), atol=1e-8
    )


def test_koopman_pipeline_on_a_dynamics_that_the_lift_makes_linear() -> None:
    H = logit_trajectory()
    dictionary = identity_dictionary(3)
    K = koopman_operator(H, full_mask(1, 40), dictionary, ridge=1e-14)
    torch.testing.assert_close(K[0], A_POSITIVE.T, rtol=1e-6, atol=1e-7)
    spectrum = koopman_spectrum(H, full_mask(1, 40), dictionary, ridge=1e-14)
    true = torch.linalg.eigvals(A_POSITIVE)
    np.testing.assert_allclose(sorted_complex(spectrum.eigvals[0].numpy()), sorted_complex(true.numpy()), atol=1e-7)
    assert spectrum.residuals.max() < 1e-6  # exact linear dynamics: every mode is a true eigenpair
    moduli = spectrum.eigvals[0].abs()
    assert (moduli[:-1] >= moduli[1:]).all()  # sorted by decreasing modulus
    expected = torch.var(true.abs())
    assert dsd(H, full_mask(1, 40), dictionary, ridge=1e-14).item() == pytest.approx(expected.item(), rel=1e-6)


def test_edmd_eigenvalues_match_pydmd_exact_dmd() -> None:
    pydmd = pytest.importorskip("pydmd")
    H = random_walk(1, 120, 6, seed=1)
    dictionary = KoopmanDictionary(6, m=10, seed=3)
    psi = dictionary.lift(H)[0].detach().double()
    dmd = pydmd.DMD(svd_rank=-1, exact=True)
    dmd.fit(psi[:-1].T.numpy(), psi[1:].T.numpy())
    expected = sorted_complex(dmd.eigs)
    assert len(expected) == 10
    for ridge in (0.0, 1e-12):
        K = edmd(psi[None, :-1], psi[None, 1:], full_mask(1, 119), ridge=ridge)
        got = sorted_complex(torch.linalg.eigvals(K[0]).numpy())
        np.testing.assert_allclose(got, expected, atol=1e-6)
    # and the full pipeline on the hidden states gives the same spectrum
    spectrum = koopman_spectrum(H, full_mask(1, 120), dictionary, ridge=1e-12)
    np.testing.assert_allclose(sorted_complex(spectrum.eigvals[0].numpy()), expected, atol=1e-6)


def test_edmd_scaling_options() -> None:
    H = random_walk(2, 30, 5, seed=2)
    mask = full_mask(2, 30)
    mask[1, 20:] = False
    dictionary = KoopmanDictionary(5, m=7)
    mean = koopman_operator(H, mask, dictionary, ridge=1e-3, scaling="mean")
    # "unscaled" adds ridge to the raw Gram: ridge * n there is the same operator as ridge with 1/n scaling
    for b, n in enumerate((29, 19)):
        unscaled = koopman_operator(H[b : b + 1], mask[b : b + 1], dictionary, ridge=1e-3 * n, scaling="unscaled")
        torch.testing.assert_close(unscaled[0], mean[b], rtol=1e-10, atol=1e-12)
    psi = dictionary.lift(H)
    pairs = mask[:, 1:]
    direct = torch.linalg.solve(
        psi[1, :19, :].T @ psi[1, :19, :] / 19 + 1e-3 * torch.eye(7, dtype=torch.float64), psi[1, :19].T @ psi[1, 1:20] / 19
    )
    torch.testing.assert_close(edmd(psi[:, :-1], psi[:, 1:], pairs)[1], direct)
    assert (koopman_operator(H[:, :1], mask[:, :1], dictionary) == 0).all()  # no pair: K = 0


def test_koopman_operator_padded_equals_per_sequence_and_is_differentiable() -> None:
    H = random_walk(3, 25, 4, seed=3)
    mask = torch.rand(3, 25, generator=torch.Generator().manual_seed(3)) < 0.7
    H[~mask] = float("nan")
    dictionary = KoopmanDictionary(4, m=5)
    K = koopman_operator(H, mask, dictionary)
    for b in range(3):
        rows = H[b][mask[b]][None]
        torch.testing.assert_close(K[b : b + 1], koopman_operator(rows, full_mask(1, rows.shape[1]), dictionary))
    assert koopman_operator(H.float(), mask, dictionary).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# DSD
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spectrum", ["eig", "singular"])
@pytest.mark.parametrize("scaling", ["mean", "unscaled"])
def test_dsd_matches_reference(spectrum: str, scaling: str) -> None:
    H = random_walk(4, 60, 16, seed=4, dtype=torch.float32)
    mask = full_mask(4, 60)
    mask[1, 40:] = False
    mask[2, :10] = False
    mask[3, 2:] = False  # 2 tokens: DSD = 0
    dictionary = KoopmanDictionary(16, m=12, seed=5)
    got = dsd(H, mask, dictionary, spectrum=spectrum, scaling=scaling)
    want = dsd_reference(H, mask, dictionary, spectrum=spectrum, scaling=scaling)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert got[3].item() == 0.0 and got[0].item() > 0


def test_dsd_padded_equals_per_sequence() -> None:
    H = random_walk(4, 30, 6, seed=6)
    mask = torch.rand(4, 30, generator=torch.Generator().manual_seed(6)) < 0.75
    dictionary = KoopmanDictionary(6, m=8)
    batch = dsd(H, mask, dictionary)
    for b in range(4):
        rows = H[b][mask[b]][None]
        torch.testing.assert_close(batch[b : b + 1], dsd(rows, full_mask(1, rows.shape[1]), dictionary), rtol=1e-10, atol=0)


@pytest.mark.parametrize("spectrum", ["eig", "singular"])
def test_dsd_gradcheck(spectrum: str) -> None:
    H = random_walk(2, 8, 3, seed=7) * 2
    mask = full_mask(2, 8)
    mask[1, 6:] = False
    dictionary = KoopmanDictionary(3, m=4, seed=1)
    assert gradcheck(lambda h: dsd(h, mask, dictionary, spectrum=spectrum), (H.clone().requires_grad_(True),))


def test_dsd_gradient_flows_to_dictionary_weight() -> None:
    H = random_walk(2, 20, 5, seed=8, dtype=torch.float32)
    dictionary = KoopmanDictionary(5, m=6)
    dsd(H, full_mask(2, 20), dictionary).sum().backward()
    assert dictionary.weight.grad is not None and dictionary.weight.grad.abs().sum() > 0


def degenerate_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(9)
    T, d = 10, 4
    base = torch.randn(1, T, d, dtype=torch.float64, generator=g)
    one = full_mask(1, T)
    return {
        "constant": (torch.full((1, T, d), 0.3, dtype=torch.float64), one),
        "period_two": (base[:, :2].repeat(1, T // 2, 1), one),  # K has eigenvalues +-1 pattern, repeated
        "one_token": (base, torch.tensor([[True] + [False] * (T - 1)])),
        "two_tokens": (base, torch.tensor([[True, True] + [False] * (T - 2)])),
        "three_tokens": (base, torch.tensor([[True] * 3 + [False] * (T - 3)])),  # n = 2 < m: repeated 0
        "no_tokens": (base, torch.zeros(1, T, dtype=torch.bool)),
        "huge": (1e6 * base, one),
        "tiny": (1e-12 * base, one),
    }


@pytest.mark.parametrize("name", list(degenerate_cases()))
@pytest.mark.parametrize("spectrum", ["eig", "singular"])
def test_dsd_finite_values_and_gradients_on_degenerate_inputs(name: str, spectrum: str) -> None:
    H, mask = degenerate_cases()[name]
    dictionary = KoopmanDictionary(4, m=6, seed=2)
    Hg = H.clone().requires_grad_(True)
    info = dsd_with_info(Hg, mask, dictionary, spectrum=spectrum)
    info.dsd.sum().backward()
    assert torch.isfinite(info.dsd).all() and torch.isfinite(Hg.grad).all()
    assert torch.isfinite(dictionary.weight.grad).all()
    if mask.sum() < 3:
        assert info.dsd.item() == 0.0 and info.kept.item() == 0 and (Hg.grad == 0).all()


def test_dsd_of_constant_trajectory_closed_form() -> None:
    # Constant lift psi: K = (psi psi^T + r I)^{-1} psi psi^T has one eigenvalue |psi|^2 / (|psi|^2 + r), m-1 zeros.
    m, ridge = 6, 1e-3
    dictionary = KoopmanDictionary(4, m=m, seed=2)
    H = torch.full((1, 10, 4), 0.3, dtype=torch.float64)
    psi = dictionary.lift(H[0, 0])
    top = (psi @ psi) / (psi @ psi + ridge)
    expected = torch.var(torch.cat([top[None], torch.zeros(m - 1, dtype=torch.float64)]))
    assert dsd(H, full_mask(1, 10), dictionary, ridge=ridge).item() == pytest.approx(expected.item(), rel=1e-8)


def test_eigenvalue_moduli_backward_is_exact_when_well_conditioned_and_finite_otherwise() -> None:
    g = torch.Generator().manual_seed(10)
    K = torch.randn(3, 5, 5, dtype=torch.float64, generator=g)
    assert gradcheck(_EigenvalueModuli.apply, (K.requires_grad_(True),))
    # Near K = I every eigenvalue is 1 (repeated): d sum|lambda| = tr(dK), so the gradient is exactly I.
    eye = torch.eye(4, dtype=torch.float64, requires_grad=True)
    _EigenvalueModuli.apply(eye[None]).sum().backward()
    torch.testing.assert_close(eye.grad, torch.eye(4, dtype=torch.float64))
    degenerate = [
        torch.tensor([[1.0, 1.0], [0.0, 1.0]]),  # Jordan block: no derivative exists
        torch.zeros(3, 3),
        torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),  # nilpotent
        torch.outer(torch.arange(1.0, 5.0), torch.ones(4)),  # rank one
    ]
    for M in degenerate:
        M = M.double()[None].requires_grad_(True)
        torch.var(_EigenvalueModuli.apply(M), dim=-1).sum().backward()
        assert torch.isfinite(M.grad).all()
        assert M.grad.abs().max() < 1e4


def test_residual_filtering() -> None:
    H = random_walk(3, 80, 6, seed=11)
    mask = full_mask(3, 80)
    dictionary = KoopmanDictionary(6, m=8, seed=4)
    spectrum = koopman_spectrum(H, mask, dictionary)
    assert torch.isfinite(spectrum.residuals).all() and (spectrum.residuals > 0).all()
    ordered = spectrum.residuals.flatten().sort().values
    tau = ((ordered[11] + ordered[12]) / 2).item()  # between two residuals: no tie at the threshold
    info = dsd_with_info(H, mask, dictionary, residual_threshold=tau)
    kept = (spectrum.residuals <= tau).sum(dim=1)
    assert info.kept.tolist() == kept.tolist()
    for b in range(3):
        chosen = spectrum.eigvals[b][spectrum.residuals[b] <= tau].abs()
        expected = torch.var(chosen).item() if len(chosen) >= 2 else 0.0
        assert info.dsd[b].item() == pytest.approx(expected, rel=1e-8, abs=1e-14)
    assert (dsd_with_info(H, mask, dictionary, residual_threshold=-1.0).dsd == 0).all()
    unfiltered = dsd_with_info(H, mask, dictionary)
    assert unfiltered.kept.tolist() == [8, 8, 8]
    torch.testing.assert_close(dsd_with_info(H, mask, dictionary, residual_threshold=1e9).dsd, unfiltered.dsd)


def test_residuals_of_unseen_modes_are_infinite() -> None:
    # 3 tokens, m = 6: K has rank 2 and its null modes are not supported by the data (v* G v = 0 ... spurious).
    H = random_walk(1, 3, 4, seed=12)
    spectrum = koopman_spectrum(H, full_mask(1, 3), KoopmanDictionary(4, m=6), ridge=1e-3)
    assert not torch.isnan(spectrum.residuals).any()
    assert torch.isfinite(spectrum.residuals[0, :2]).all()


def test_dsd_input_validation() -> None:
    H = random_walk(2, 10, 4, seed=13)
    mask = full_mask(2, 10)
    dictionary = KoopmanDictionary(4, m=3)
    with pytest.raises(ValueError, match="dictionary"):
        dsd(H, mask, KoopmanDictionary(5, m=3))
    with pytest.raises(ValueError, match="dictionary"):
        dsd(H, mask, dictionary.weight)
    with pytest.raises(ValueError, match="spectrum"):
        dsd(H, mask, dictionary, spectrum="eigs")
    with pytest.raises(ValueError, match="residual_threshold"):
        dsd(H, mask, dictionary, spectrum="singular", residual_threshold=0.1)
    with pytest.raises(ValueError, match="ridge"):
        dsd(H, mask, dictionary, ridge=-1.0)
    with pytest.raises(ValueError, match="scaling"):
        koopman_operator(H, mask, dictionary, scaling="sum")
    H[1, 4, 2] = float("nan")
    with pytest.raises(ValueError, match="response 1"):
        dsd(H, mask, dictionary)
    with pytest.raises(ValueError, match="psi_y"):
        edmd(torch.zeros(1, 4, 3), torch.zeros(1, 5, 3), full_mask(1, 4))


def test_bf16_input() -> None:
    H = random_walk(2, 30, 8, seed=14, dtype=torch.bfloat16)
    dictionary = KoopmanDictionary(8, m=5)
    out = dsd(H, full_mask(2, 30), dictionary)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, dsd(H.float(), full_mask(2, 30), dictionary))
    assert koopman_spectrum(H, full_mask(2, 30), dictionary).eigvals.dtype == torch.complex64


# ---------------------------------------------------------------------------------------------------------
# the dictionary
# ---------------------------------------------------------------------------------------------------------


def test_dictionary_initialisation_is_deterministic() -> None:
    a, b, c = KoopmanDictionary(64, m=50, seed=0), KoopmanDictionary(64, m=50, seed=0), KoopmanDictionary(64, m=50, seed=1)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert a.weight.shape == (50, 64) and a.weight.dtype == torch.float32
    assert a.weight.std().item() == pytest.approx(1 / 8, rel=0.05)  # Normal(0, 1/d)
    x = torch.randn(3, 7, 64)
    torch.testing.assert_close(a.lift(x), torch.sigmoid(x @ a.weight.T))
    with pytest.raises(ValueError, match="hidden_size"):
        KoopmanDictionary(0)
    with pytest.raises(ValueError, match="hidden size"):
        a.lift(torch.randn(2, 63))


def residual_objective(dictionary: KoopmanDictionary, H: torch.Tensor, mask: torch.Tensor) -> float:
    lengths = mask.sum(dim=1)
    with torch.no_grad():
        return float(dictionary._batch_loss(H.float(), lengths, "residual", 1e-3, "mean"))


@pytest.mark.parametrize("loss", ["residual", "svd"])
def test_fit_reduces_the_objective_and_records_attributes(loss: str) -> None:
    H = random_walk(12, 30, 6, seed=15, dtype=torch.float32)
    mask = full_mask(12, 30)
    dictionary = KoopmanDictionary(6, m=5, seed=3, fit_lr=3e-2, fit_batch_size=4, fit_epochs=5, fit_loss=loss)
    before = residual_objective(dictionary, H, mask)
    w0 = dictionary.weight.detach().clone()
    out = dictionary.fit(H, mask)
    assert out is dictionary
    assert dictionary.steps_ == 15 and len(dictionary.loss_history_) == 15
    assert dictionary.fit_params_["loss"] == loss and dictionary.n_trajectories_ == 60
    assert not torch.equal(w0, dictionary.weight) and torch.isfinite(dictionary.weight).all()
    if loss == "residual":
        assert residual_objective(dictionary, H, mask) < before


def test_fit_is_reproducible_and_survives_degenerate_trajectories() -> None:
    H = random_walk(6, 12, 4, seed=16, dtype=torch.float32)
    mask = full_mask(6, 12)
    H[0] = 1.0  # constant trajectory: K of rank one, repeated eigenvalue 0
    mask[1, 1:] = False  # a single token: no pair
    settings = dict(fit_lr=1e-2, fit_batch_size=2, fit_epochs=2)
    a = KoopmanDictionary(4, m=6, seed=7, **settings).fit(H, mask)
    b = KoopmanDictionary(4, m=6, seed=7, **settings).fit(H, mask)
    assert torch.equal(a.weight, b.weight) and a.loss_history_ == b.loss_history_
    assert torch.isfinite(a.weight).all() and all(np.isfinite(a.loss_history_))
    c = KoopmanDictionary(4, m=6, seed=7, fit_loss="svd", fit_batch_size=1).fit(H, mask)
    assert torch.isfinite(c.weight).all()
    frozen = KoopmanDictionary(4, m=6, seed=7, **settings).requires_grad_(False)  # a frozen dictionary can be refit
    with torch.no_grad():
        frozen.fit(H, mask)
    assert torch.equal(frozen.weight, a.weight) and not frozen.weight.requires_grad
    with pytest.raises(ValueError, match="loss"):
        KoopmanDictionary(4, m=6, seed=7, fit_loss="l2")
    with pytest.raises(ValueError, match="batch_size"):
        KoopmanDictionary(4, m=6, seed=7, fit_batch_size=0)


def test_save_and_load_roundtrip(tmp_path) -> None:
    H = random_walk(4, 20, 5, seed=17, dtype=torch.float32)
    dictionary = KoopmanDictionary(5, m=4, seed=11, fit_lr=1e-2, fit_batch_size=2).fit(H, full_mask(4, 20))
    path = tmp_path / "koopman.safetensors"
    dictionary.save(path)
    loaded = KoopmanDictionary.load(path)
    assert torch.equal(loaded.weight, dictionary.weight)
    assert (loaded.hidden_size, loaded.m, loaded.seed, loaded.steps_) == (5, 4, 11, 2)
    assert loaded.loss_history_ == dictionary.loss_history_ and loaded.fit_params_ == dictionary.fit_params_
    torch.testing.assert_close(dsd(H, full_mask(4, 20), loaded), dsd(H, full_mask(4, 20), dictionary))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="KoopmanDictionary"):
        KoopmanDictionary.load(tmp_path / "other.safetensors")
