"""The Koopman estimator (KoopmanDictionary with every setting), the authors' options (METHODS.md section 3a)
against independent slow re-implementations, and the numeric guards (issue 18 items 5-7)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch.autograd import gradcheck

from latentx.dynamics import (
    AUTHORS_SEED,
    RIDGE_FLOOR,
    KoopmanDictionary,
    KoopmanSettings,
    authors_settings,
    dsd,
    dsd_reference,
    dsd_with_info,
    koopman_operator,
    koopman_spectrum,
)
from latentx.dynamics.koopman import _ComputeCast


def walk(B: int, T: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, d, generator=g).cumsum(dim=1) / 3 + torch.randn(B, T, d, generator=g)).to(dtype)


def ragged_mask(B: int, T: int, seed: int) -> torch.Tensor:
    """Holes, left padding and short responses: valid rows are taken in order wherever they sit."""
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.8
    mask[0] = True
    if B > 1:
        mask[1, : T // 3] = False  # left padding
    return mask


# ---------------------------------------------------------------------------------------------------------
# Independent slow re-implementations of METHODS.md section 2 / 3a: one trajectory at a time, float64,
# written from the text (not from the fast code).
# ---------------------------------------------------------------------------------------------------------


def slow_lift(W: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-(rows.double() @ W.double().T)))


def slow_trajectory(H: torch.Tensor, mask: torch.Tensor, b: int, pad_to: int = 0) -> torch.Tensor:
    rows = torch.stack([H[b, t].double() for t in range(H.shape[1]) if bool(mask[b, t])]) if mask[b].any() else \
        torch.zeros(0, H.shape[2], dtype=torch.float64)
    if pad_to:
        rows = torch.cat([rows, torch.zeros(pad_to - rows.shape[0], H.shape[2], dtype=torch.float64)])
    return rows


def slow_dsd(W, H, mask, spectrum="eig", ridge=1e-3, scaling="mean", pad_to=0) -> list[float]:
    out = []
    for b in range(H.shape[0]):
        rows = slow_trajectory(H, mask, b, pad_to)
        if rows.shape[0] < 3:
            out.append(0.0)
            continue
        psi = slow_lift(W, rows)
        X, Y = psi[:-1], psi[1:]
        n = X.shape[0] if scaling == "mean" else 1
        K = torch.linalg.solve(X.T @ X / n + ridge * torch.eye(W.shape[0], dtype=torch.float64), X.T @ Y / n)
        if spectrum == "eig":
            r = torch.linalg.eigvals(K).abs()
        else:
            r = torch.sqrt(torch.linalg.svdvals(K) ** 2 + 1e-3)
        out.append(float(((r - r.mean()) ** 2).sum() / (len(r) - 1)))
    return out


def slow_authors_fit_loss(W: torch.Tensor, H, mask, window: int | None, ridge=1e-3, loss="svd") -> torch.Tensor:
    """||Psi_Y Vh - Psi_X Vh S||_F / B, ONE K over all pairs of the batch (raw Gram + ridge I), Vh as
    torch.linalg.svd returns it, gradient through the SVD.  ``window``: first W positions, zero-padded."""
    xs, ys = [], []
    for b in range(H.shape[0]):
        rows = slow_trajectory(H, mask, b)
        if window is not None:
            rows = rows[:window]
            rows = torch.cat([rows, torch.zeros(window - rows.shape[0], H.shape[2], dtype=torch.float64)])
        psi = slow_lift(W, rows)
        for t in range(psi.shape[0] - 1):
            xs.append(psi[t])
            ys.append(psi[t + 1])
    X, Y = torch.stack(xs), torch.stack(ys)
    if loss == "svd":
        K = torch.linalg.solve(X.T @ X + ridge * torch.eye(W.shape[0], dtype=torch.float64), X.T @ Y)
        U, S, Vh = torch.linalg.svd(K)
        return torch.sqrt(((Y @ Vh - X @ Vh @ torch.diag(S)) ** 2).sum()) / H.shape[0]
    n = X.shape[0]
    K = torch.linalg.solve(X.T @ X / n + ridge * torch.eye(W.shape[0], dtype=torch.float64), X.T @ Y / n)
    _, phi = torch.linalg.eig(K.detach())
    R = (Y - X @ K).to(torch.complex128) @ phi
    return (R.abs() ** 2).sum() / n


# ---------------------------------------------------------------------------------------------------------
# Settings, construction, persistence
# ---------------------------------------------------------------------------------------------------------


def test_settings_are_given_once_and_named_like_relax_config() -> None:
    from latentx.objectives import RelaxConfig

    d = KoopmanDictionary(6, m=5, seed=3, spectrum="singular", scaling="unscaled", pad_to=40, fit_loss="svd")
    assert d.settings.spectrum == "singular" and d.settings.pad_to == 40 and d.settings.fit_window is None
    assert d.config()["m"] == 5 and d.config()["seed"] == 3
    # every RelaxConfig signal field that exists is a setting of the same name
    relax_fields = set(vars(RelaxConfig()))
    for name in ("spectrum", "ridge", "scaling", "residual_threshold", "fit_lr", "fit_batch_size", "fit_loss"):
        assert name in relax_fields and name in KoopmanSettings.names()
    cfg = RelaxConfig(spectrum="singular", m=7, ridge=1e-2, fit_seed=9, fit_lr=3e-3, fit_loss="svd")
    built = KoopmanDictionary.from_config(cfg, 6, fit_epochs=2)
    assert (built.m, built.seed, built.settings.ridge, built.settings.fit_lr, built.settings.fit_epochs) == (
        7, 9, 1e-2, 3e-3, 2)
    assert KoopmanSettings(pad_to=None).pad_to == 0 and KoopmanSettings(fit_window=0).fit_window is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("spectrum", "eigs"), ("ridge", 0.0), ("ridge", 1e-13), ("ridge", float("nan")), ("scaling", "sum"),
        ("residual_threshold", -1.0), ("init", "xavier"), ("pad_to", -1), ("pad_to", 2.5), ("fit_window", 1),
        ("fit_loss", "l2"), ("fit_lr", 0.0), ("fit_batch_size", 0), ("fit_epochs", True),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field) as info:
        KoopmanDictionary(4, **{field: value})
    assert "\n" not in str(info.value)


def test_unknown_setting_and_residual_threshold_with_singular() -> None:
    with pytest.raises(ValueError, match="unknown Koopman setting 'ridg'"):
        KoopmanDictionary(4, ridg=1e-3)
    with pytest.raises(ValueError, match="residual_threshold"):
        KoopmanDictionary(4, spectrum="singular", residual_threshold=0.5)


def test_methods_use_the_settings_and_functions_default_to_them() -> None:
    H, mask = walk(3, 30, 5, seed=1), ragged_mask(3, 30, seed=1)
    d = KoopmanDictionary(5, m=6, seed=2, spectrum="singular", scaling="unscaled", ridge=1e-2)
    want = dsd(H, mask, KoopmanDictionary(5, m=6, seed=2), spectrum="singular", scaling="unscaled", ridge=1e-2)
    torch.testing.assert_close(d.dsd(H, mask), want)
    torch.testing.assert_close(dsd(H, mask, d), want)
    torch.testing.assert_close(d.dsd_with_info(H, mask).dsd, want)
    torch.testing.assert_close(d.operator(H, mask), koopman_operator(H, mask, d, ridge=1e-2, scaling="unscaled"))
    torch.testing.assert_close(d.spectrum(H, mask).eigvals, koopman_spectrum(H, mask, d).eigvals)
    # an explicit argument overrides the setting
    torch.testing.assert_close(dsd(H, mask, d, spectrum="eig"), dsd(H, mask, KoopmanDictionary(5, m=6, seed=2),
                                                                    scaling="unscaled", ridge=1e-2))
    filtered = KoopmanDictionary(5, m=6, seed=2, residual_threshold=1e-9)
    assert (filtered.dsd(H, mask) == 0).all()  # no mode has a residual that small


def test_save_load_roundtrips_every_setting_and_refuses_other_settings(tmp_path) -> None:
    settings = dict(spectrum="eig", ridge=2e-3, scaling="unscaled", residual_threshold=0.7, init="kaiming_uniform",
                    pad_to=64, fit_window=16, fit_loss="svd", fit_lr=5e-3, fit_batch_size=3, fit_epochs=2)
    H, mask = walk(5, 20, 4, seed=3, dtype=torch.float32), ragged_mask(5, 20, seed=3)
    d = KoopmanDictionary(4, m=5, seed=42, **settings).fit(H, mask)
    path = tmp_path / "k.safetensors"
    d.save(path)
    loaded = KoopmanDictionary.load(path, expect=d)
    assert loaded.settings == d.settings and loaded.config() == d.config() and loaded.fitted_
    assert torch.equal(loaded.weight, d.weight) and loaded.loss_history_ == d.loss_history_
    torch.testing.assert_close(loaded.dsd(H, mask), d.dsd(H, mask))
    for field, other in [("ridge", 1e-3), ("pad_to", 0), ("fit_loss", "residual"), ("init", "normal"),
                         ("fit_window", None), ("seed", 0), ("m", 6), ("hidden_size", 8)]:
        expect = dict(d.config(), **{field: other})
        with pytest.raises(ValueError, match=f"saved with {field}=") as info:
            KoopmanDictionary.load(path, expect=expect)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_reads_the_first_file_format(tmp_path) -> None:
    from safetensors.torch import save_file

    meta = dict(format="latentx.KoopmanDictionary/1", hidden_size=3, m=2, seed=4, init="x", steps=1, skipped_steps=0,
                n_trajectories=2, fit_params=dict(lr=0.01, batch_size=2, epochs=1, loss="svd", ridge=0.002,
                                                  scaling="mean"), loss=None, loss_history=[1.0])
    save_file({"weight": torch.ones(2, 3)}, str(tmp_path / "old.safetensors"),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    loaded = KoopmanDictionary.load(tmp_path / "old.safetensors")
    assert (loaded.settings.fit_loss, loaded.settings.ridge, loaded.settings.fit_lr) == ("svd", 0.002, 0.01)
    assert loaded.settings.spectrum == "eig" and loaded.fitted_


# ---------------------------------------------------------------------------------------------------------
# The authors' options (METHODS.md 3a) against the slow re-implementations
# ---------------------------------------------------------------------------------------------------------


def test_authors_init_is_kaiming_uniform_a_sqrt7_under_their_seed() -> None:
    d_in, m = 64, 50
    d = KoopmanDictionary(d_in, m=m, seed=AUTHORS_SEED, init="kaiming_uniform")
    gain = math.sqrt(2.0 / (1.0 + 7.0))  # leaky-relu gain with negative slope a = sqrt(7)
    bound = gain * math.sqrt(3.0 / d_in)
    expected = torch.empty(m, d_in).uniform_(-bound, bound, generator=torch.Generator().manual_seed(42))
    assert torch.equal(d.weight.detach(), expected)
    assert d.weight.std().item() == pytest.approx(0.5 / math.sqrt(d_in), rel=0.05)
    assert not torch.equal(d.weight, KoopmanDictionary(d_in, m=m, seed=AUTHORS_SEED).weight)  # not "normal"
    assert authors_settings(3072)["pad_to"] == 3072 and authors_settings(3072)["init"] == "kaiming_uniform"


@pytest.mark.parametrize("spectrum", ["eig", "singular"])
@pytest.mark.parametrize("scaling", ["unscaled", "mean"])
def test_pad_to_matches_the_explicitly_zero_padded_trajectory(spectrum: str, scaling: str) -> None:
    H, mask = walk(4, 24, 5, seed=4, dtype=torch.float32), ragged_mask(4, 24, seed=4)
    mask[3] = False
    mask[3, :2] = True  # a 2-token response: still P - 1 pairs once padded
    H[~mask] = float("nan")  # whatever sits in the padding, the authors' padding is zeros
    for P in (24, 40):
        d = KoopmanDictionary(5, m=6, seed=5, spectrum=spectrum, scaling=scaling, pad_to=P)
        got = d.dsd(H, mask)
        want = slow_dsd(d.weight, H, mask, spectrum=spectrum, scaling=scaling, pad_to=P)
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=2e-4, atol=1e-7)
        torch.testing.assert_close(dsd_reference(H, mask, d).double(), got.double(), rtol=2e-4, atol=1e-7)
        assert got[3] > 0
    masked = KoopmanDictionary(5, m=6, seed=5, spectrum=spectrum, scaling=scaling).dsd(H, mask)
    assert not torch.allclose(masked, got)  # padding is not masked


def test_pad_to_gradient_and_too_short_error() -> None:
    H, mask = walk(2, 7, 3, seed=6) * 2, torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    d = KoopmanDictionary(3, m=4, seed=1, spectrum="singular", scaling="unscaled", pad_to=10)
    assert gradcheck(lambda h: d.dsd(h, mask), (H.clone().requires_grad_(True),))
    with pytest.raises(ValueError, match=r"pad_to=5 is smaller than response 0 \(7 valid tokens\)"):
        KoopmanDictionary(3, m=4, pad_to=5).dsd(H, mask)
    with pytest.raises(ValueError, match="pad_to=5"):
        KoopmanDictionary(3, m=4, pad_to=5).spectrum(H, mask)


@pytest.mark.parametrize("window", [None, 9, 30])
def test_authors_svd_fit_loss_value_and_gradient(window) -> None:
    H, mask = walk(5, 20, 4, seed=7), ragged_mask(5, 20, seed=7)
    d = KoopmanDictionary(4, m=6, seed=AUTHORS_SEED, init="kaiming_uniform", scaling="unscaled", fit_loss="svd",
                          fit_window=window)
    W = d.weight.detach().double().clone().requires_grad_(True)
    want = slow_authors_fit_loss(W, H, mask, window)
    want.backward()
    got = d.fit_objective(H, mask)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    torch.testing.assert_close(d.weight.grad.double(), W.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("window", [None, 12])
def test_residual_fit_loss_against_the_slow_one(window) -> None:
    H, mask = walk(4, 16, 4, seed=8), ragged_mask(4, 16, seed=8)
    d = KoopmanDictionary(4, m=5, seed=1, fit_window=window)
    W = d.weight.detach().double().clone().requires_grad_(True)
    want = slow_authors_fit_loss(W, H, mask, window, loss="residual")
    want.backward()
    got = d.fit_objective(H, mask)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-8)
    torch.testing.assert_close(d.weight.grad.double(), W.grad, rtol=1e-5, atol=1e-8)


def test_fit_takes_adam_steps_on_the_authors_objective_from_a_fresh_w() -> None:
    H, mask = walk(6, 14, 4, seed=9), ragged_mask(6, 14, seed=9)
    d = KoopmanDictionary(4, m=5, seed=AUTHORS_SEED, **dict(authors_settings(14), fit_window=10))
    W0 = d.weight.detach().double().clone().requires_grad_(True)
    loss0 = slow_authors_fit_loss(W0, H, mask, 10)  # one mini-batch holds all 6 trajectories
    loss0.backward()
    d.fit(H, mask)
    assert d.steps_ == 1 and d.loss_history_[0] == pytest.approx(loss0.item(), rel=1e-6)
    g = W0.grad
    step = 1e-3 * g / (g.abs() + 1e-8)  # Adam's first step
    torch.testing.assert_close(d.weight.detach().double(), W0.detach() - step, rtol=0, atol=1e-6)
    first = d.weight.detach().clone()
    d.fit(H, mask)  # a refit starts again from the initial draw
    assert torch.equal(d.weight.detach(), first) and d.steps_ == 1


# ---------------------------------------------------------------------------------------------------------
# Numeric guards (issue 18 items 5-7)
# ---------------------------------------------------------------------------------------------------------


def test_ridge_zero_never_reaches_the_eigen_solver_with_a_bad_matrix() -> None:
    # Before the floor this died with "double free or corruption" inside torch.linalg.eig (subprocess).
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "from latentx.dynamics import KoopmanDictionary, koopman_spectrum, dsd\n"
        "for seed in range(40):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    H = (torch.randint(0, 2, (1, 8, 1), generator=g).float() * 2 - 1) * 1e30\n"
        "    d = KoopmanDictionary(1, m=50, seed=seed)\n"
        "    m = torch.ones(1, 8, dtype=torch.bool)\n"
        "    for _ in range(5):\n"
        "        s = koopman_spectrum(H, m, d, ridge=0.0)\n"
        "        v = dsd(H, m, d, ridge=0.0)\n"
        "        assert torch.isfinite(s.eigvals).all() and torch.isfinite(v).all()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-500:]


def test_ridge_below_the_floor_warns_in_functions_and_is_an_error_in_the_estimator() -> None:
    H = torch.zeros(1, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    d = KoopmanDictionary(4, m=6)
    with pytest.warns(UserWarning, match="ridge floor"):
        value = dsd(H, mask, d, ridge=0.0)
    assert torch.isfinite(value).all()
    with pytest.warns(UserWarning, match="ridge floor"):
        assert torch.isfinite(koopman_spectrum(H, mask, d, ridge=0.0).eigvals).all()
    with pytest.raises(ValueError, match="ridge must be a finite number >= 1e-12"):
        KoopmanDictionary(4, ridge=0.0)
    assert RIDGE_FLOOR == 1e-12


def test_huge_inputs_give_the_float64_result_not_a_runtime_error() -> None:
    d = KoopmanDictionary(2, m=3, seed=0)
    with torch.no_grad():
        d.weight.copy_(torch.tensor([[2.0, -2.0], [1.0, 0.5], [-0.5, 1.0]]))
    g = torch.Generator().manual_seed(0)
    H = (torch.rand(2, 6, 2, generator=g) * 0.2 + 0.8) * 3e38  # 2 * 3e38 overflows float32: inf - inf
    mask = torch.ones(2, 6, dtype=torch.bool)
    got = dsd(H, mask, d)
    want = dsd(H.double(), mask, d)
    assert torch.isfinite(got).all() and torch.isfinite(koopman_spectrum(H, mask, d).eigvals).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    Hg = H.clone().requires_grad_(True)
    d.dsd_with_info(Hg, mask).dsd.sum().backward()
    assert torch.isfinite(Hg.grad).all()
    # float64 inputs whose pre-activation overflows float64: a ValueError naming the response
    H64 = torch.ones(2, 6, 2, dtype=torch.float64)
    H64[1] = 1e308
    with pytest.raises(ValueError, match="response 1"):
        dsd(H64, mask, d)


@pytest.mark.parametrize("B, T, valid", [(0, 5, None), (3, 5, "none"), (3, 5, "singles"), (3, 0, None)])
def test_empty_fit_batches_are_value_errors(B: int, T: int, valid) -> None:
    H = torch.randn(B, T, 4)
    mask = torch.zeros(B, T, dtype=torch.bool)
    if valid == "singles":
        mask[:, 0] = True
    d = KoopmanDictionary(4, m=3)
    with pytest.raises(ValueError, match="fit: .*(no response|no valid token|2 valid tokens)") as info:
        d.fit(H, mask)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="fit_objective"):
        d.fit_objective(H, mask)
    if valid == "singles":  # with the authors' window the padded single tokens do make pairs
        KoopmanDictionary(4, m=3, fit_window=4).fit(H, mask)


def test_float16_rank_one_trajectory_has_finite_gradients() -> None:
    H = (torch.arange(8.0)[:, None] * torch.ones(1, 4)).half()[None].requires_grad_(True)
    mask = torch.ones(1, 8, dtype=torch.bool)
    for ridge in (0.0, 1e-3):
        H.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = dsd(H, mask, KoopmanDictionary(4, m=6), ridge=ridge)
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(H.grad).all()


def test_compute_cast_guards_each_response_gradient() -> None:
    H = torch.zeros(3, 2, 2, dtype=torch.float16, requires_grad=True)
    out = _ComputeCast.apply(H, torch.float32)
    upstream = torch.tensor([[[1e6, -2e6], [1.0, 0.0]], [[float("nan"), 1.0], [1.0, 1.0]], [[0.5, -0.25], [1.0, 2.0]]])
    out.backward(upstream)
    grad = H.grad.float()
    assert torch.isfinite(grad).all()
    assert (grad[1] == 0).all()  # a non-finite entry zeroes that response's gradient only
    torch.testing.assert_close(grad[2], upstream[2])  # untouched
    assert grad[0].abs().max() <= 65504 and grad[0, 0, 1] / grad[0, 0, 0] == pytest.approx(-2.0, rel=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("pad_to", [0, 6])
def test_short_constant_and_padded_nan_inputs_are_finite(dtype, pad_to: int) -> None:
    T = 6
    H = torch.randn(5, T, 3).to(dtype)
    mask = torch.zeros(5, T, dtype=torch.bool)
    for b, n in enumerate((0, 1, 2, 3, T)):
        mask[b, :n] = True
    H[4] = 0.7  # constant
    H = torch.where(mask[:, :, None], H, torch.tensor(float("nan"), dtype=dtype)).requires_grad_(True)
    d = KoopmanDictionary(3, m=4, pad_to=pad_to)
    info = d.dsd_with_info(H, mask)
    info.dsd.sum().backward()
    assert torch.isfinite(info.dsd).all() and torch.isfinite(H.grad.float()).all()
    assert torch.isfinite(d.spectrum(H.detach(), mask).eigvals).all()
    assert d.dsd(H[:0], mask[:0]).shape == (0,)


def test_refit_schedule_and_installed_weights_round_trip(tmp_path) -> None:
    H, mask = walk(4, 12, 3, seed=10, dtype=torch.float32), torch.ones(4, 12, dtype=torch.bool)
    d = KoopmanDictionary(3, m=4)
    assert d.refit_due(0, 0) and d.refit_due(7, 5)  # never fitted: fit now
    d.fit(H, mask, step=0)
    assert d.fitted_step_ == 0 and not d.refit_due(0, 5) and not d.refit_due(3, 5) and d.refit_due(5, 5)
    assert not d.refit_due(50, 0)  # refit_every = 0: fitted once
    d.save(tmp_path / "d.safetensors")
    loaded = KoopmanDictionary.load(tmp_path / "d.safetensors")
    assert loaded.fitted_step_ == 0 and not loaded.refit_due(0, 5)
    other = KoopmanDictionary(3, m=4).set_fitted_weight(d.weight.detach() * 2, step=5)
    assert other.fitted_ and other.fitted_step_ == 5 and torch.equal(other.weight, d.weight * 2)
    with pytest.raises(ValueError, match=r"weight has shape \[4, 4\]"):
        other.set_fitted_weight(torch.zeros(4, 4))


def test_pad_to_minus_one_is_the_runs_maximum_response_length() -> None:
    from types import SimpleNamespace

    cfg = SimpleNamespace(m=4, fit_seed=42, pad_to=-1, spectrum="singular")
    d = KoopmanDictionary.from_config(cfg, 3, max_response_tokens=128)
    assert d.settings.pad_to == 128 and d.seed == 42 and d.settings.spectrum == "singular"
    with pytest.raises(ValueError, match="pad_to=-1"):
        KoopmanDictionary.from_config(cfg, 3)
