"""ReLaX objective: L_xp, the KL set I (paper / code), α/β scaling (METHODS.md §3 "relax")."""

from __future__ import annotations

import math

import pytest
import torch

from latentx.objectives import GRPOConfig, PolicyBatch, RelaxConfig, exploration_term, relax_kl_set, relax_loss


def _batch(adv: list[float], dsd: torch.Tensor, group: list[int], ref_shift: list[float] | None = None) -> PolicyBatch:
    B, T = len(adv), 3
    old = torch.full((B, T), -1.0)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = False
    ref = None
    if ref_shift is not None:
        ref = old + torch.tensor(ref_shift)[:, None]
    return PolicyBatch(
        logp=old.clone().requires_grad_(),
        old_logp=old,
        mask=mask,
        advantages=torch.tensor(adv),
        group=torch.tensor(group),
        ref_logp=ref,
        dsd=dsd,
    )


def _lme(xs: list[float]) -> float:
    return math.log(sum(math.exp(x) for x in xs) / len(xs))


def test_exploration_term_group_vs_microbatch() -> None:
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    dsd = torch.tensor([2.0, 3.0, 1.0, 0.5])
    group = torch.tensor([0, 0, 1, 1])
    # exponents −max(Â,0)·DSD: [−2, 0, −0.5, −1]
    by_group = (_lme([-2.0, 0.0]) + _lme([-0.5, -1.0])) / 2
    whole = _lme([-2.0, 0.0, -0.5, -1.0])
    assert exploration_term(adv, dsd, group, "group").item() == pytest.approx(by_group, rel=1e-6)
    assert exploration_term(adv, dsd, group, "microbatch").item() == pytest.approx(whole, rel=1e-6)
    assert by_group != pytest.approx(whole)


def test_exploration_term_groups_need_not_be_contiguous_or_equal_size() -> None:
    adv = torch.tensor([1.0, 1.0, 1.0])
    dsd = torch.tensor([1.0, 2.0, 3.0])
    group = torch.tensor([5, 9, 5])
    expected = (_lme([-1.0, -3.0]) + _lme([-2.0])) / 2
    assert exploration_term(adv, dsd, group, "group").item() == pytest.approx(expected, rel=1e-6)


def test_exploration_term_is_stable_for_huge_exponents() -> None:
    adv = torch.tensor([5.0, 5.0])
    dsd = torch.tensor([1000.0, 2000.0], requires_grad=True)
    xp = exploration_term(adv, dsd, torch.tensor([0, 0]), "group")
    assert xp.item() == pytest.approx(-5000.0 - math.log(2), rel=1e-6)
    xp.backward()
    assert torch.isfinite(dsd.grad).all()


def test_kl_set_paper_and_code() -> None:
    adv = torch.tensor([1.0, 1.0, -1.0, 0.0])
    dsd = torch.tensor([30.0, 10.0, 26.0, 40.0])
    assert relax_kl_set(adv, dsd, 25.0, "paper").tolist() == [True, False, True, True]
    assert relax_kl_set(adv, dsd, 25.0, "code").tolist() == [True, False, False, False]


def test_relax_loss_terms_by_hand() -> None:
    adv = [1.0, -1.0, 0.5, 2.0]
    dsd = torch.tensor([30.0, 3.0, 1.0, 26.0], requires_grad=True)
    # Reference shifts δ per response: KL_i = e^δ − δ − 1 on every token (token mean = same value).
    shifts = [0.5, 0.2, -0.3, 0.1]
    batch = _batch(adv, dsd, [0, 0, 1, 1], ref_shift=shifts)
    cfg = RelaxConfig(alpha=0.3, beta=0.5, xi=25.0)
    out = relax_loss(batch, cfg, GRPOConfig())
    xp = (_lme([-30.0, 0.0]) + _lme([-0.5, -52.0])) / 2
    kl = [math.exp(d) - d - 1 for d in shifts]
    kl_set = (kl[0] + kl[3]) / 2  # I = {0, 3} (DSD > 25)
    pg = -(1.0 * 2 + -1.0 * 3 + 0.5 * 3 + 2.0 * 3) / 11  # ratio 1, token mean over 11 tokens
    assert out.terms["xp"] == pytest.approx(xp, rel=1e-6)
    assert out.terms["kl_set_size"] == 2.0
    assert out.terms["kl_set_kl"] == pytest.approx(kl_set, rel=1e-5)
    assert out.terms["pg"] == pytest.approx(pg, rel=1e-6)
    assert out.terms["ref_available"] == 1.0
    assert out.loss.item() == pytest.approx(pg + 0.3 * xp + 0.5 * kl_set, rel=1e-5)
    assert out.terms["dsd_mean"] == pytest.approx(15.0)


def test_alpha_and_beta_scale_their_terms() -> None:
    dsd = torch.tensor([30.0, 3.0, 1.0, 26.0])
    batch = _batch([1.0, -1.0, 0.5, 2.0], dsd, [0, 0, 1, 1], ref_shift=[0.5, 0.2, -0.3, 0.1])
    clip = GRPOConfig()
    base = relax_loss(batch, RelaxConfig(alpha=0.0, beta=0.0), clip)
    a = relax_loss(batch, RelaxConfig(alpha=0.7, beta=0.0), clip)
    b = relax_loss(batch, RelaxConfig(alpha=0.0, beta=2.0), clip)
    assert base.loss.item() == pytest.approx(base.terms["pg"], abs=1e-7)
    assert a.loss.item() - base.loss.item() == pytest.approx(0.7 * a.terms["xp"], rel=1e-5)
    assert b.loss.item() - base.loss.item() == pytest.approx(2.0 * b.terms["kl_set_kl"], rel=1e-5)


def test_code_kl_set_detaches_the_exploration_gradient() -> None:
    adv = [1.0, 2.0, -1.0, 0.5]
    grads = {}
    for kl_set in ("paper", "code"):
        dsd = torch.tensor([30.0, 0.2, 40.0, 0.4], requires_grad=True)
        batch = _batch(adv, dsd, [0, 0, 0, 0], ref_shift=[0.1, 0.1, 0.1, 0.1])
        relax_loss(batch, RelaxConfig(kl_set=kl_set, alpha=1.0, xi=25.0), GRPOConfig()).loss.backward()
        grads[kl_set] = dsd.grad.clone()
    # Response 0 has Â > 0 and DSD > ξ: in I for "code", so its L_xp contribution is a constant.
    assert grads["paper"][0] != 0.0
    assert grads["code"][0] == 0.0
    # Response 1 (not in I) keeps its gradient in both, with the sign that raises its DSD.
    assert grads["code"][1] < 0.0 and grads["paper"][1] < 0.0
    # Response 2 has Â < 0: max(Â, 0) = 0, no exploration gradient in either variant.
    assert grads["paper"][2] == 0.0 and grads["code"][2] == 0.0
    # Analytic gradient for response 1 in "code" mode: d/dDSD_1 of log mean exp(x), x_1 = −2·DSD_1.
    x = [-30.0, -0.4, 0.0, -0.2]  # response 0 detached but still in the sum
    w1 = math.exp(x[1]) / sum(math.exp(v) for v in x)
    assert grads["code"][1].item() == pytest.approx(-2.0 * w1, rel=1e-5)


def test_no_reference_means_no_kl_term_and_says_so() -> None:
    dsd = torch.tensor([30.0, 3.0])
    batch = _batch([1.0, -1.0], dsd, [0, 0], ref_shift=None)
    out = relax_loss(batch, RelaxConfig(beta=1.0), GRPOConfig())
    assert out.terms["ref_available"] == 0.0
    assert out.terms["kl_set_kl"] == 0.0
    assert out.terms["kl_set_size"] == 1.0
    assert out.loss.item() == pytest.approx(out.terms["pg"] + 0.1 * out.terms["xp"], rel=1e-6)


def test_relax_needs_dsd() -> None:
    batch = _batch([1.0], None, [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch.dsd"):
        relax_loss(batch, RelaxConfig(), GRPOConfig())


def test_relax_config_validation() -> None:
    with pytest.raises(ValueError, match=r"relax\.alpha must be >= 0, got -1.0"):
        RelaxConfig(alpha=-1.0)
    with pytest.raises(ValueError, match=r"relax\.kl_set"):
        RelaxConfig(kl_set="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"relax\.lme_scope"):
        RelaxConfig(lme_scope="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"relax\.m"):
        RelaxConfig(m=1)
    with pytest.raises(ValueError, match=r"relax\.residual_threshold"):
        RelaxConfig(residual_threshold=0.0)
    with pytest.raises(ValueError, match=r"relax\.fit_loss"):
        RelaxConfig(fit_loss="l2")  # type: ignore[arg-type]
    assert RelaxConfig(spectrum="singular", scaling="unscaled", refit_every=50).refit_every == 50
