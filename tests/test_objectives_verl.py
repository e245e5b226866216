"""VERL advantage shaping with effective-rank signals (METHODS.md §3 "verl")."""

from __future__ import annotations

import math

import pytest
import torch

from latentx.objectives import (
    VerlBaselines,
    VerlConfig,
    VerlInputs,
    VerlShaper,
    group_advantages,
    verl_shape,
    verl_token_advantages,
    verl_update_baselines,
)

# Two groups of four responses.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
GROUP = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
ER = torch.tensor([12.0, 8.0, 10.0, 15.0, 9.0, 11.0, 10.0, 80.0])
ERV = torch.tensor([1.5, 0.5, -1.0, 2.0, 0.0, 1.0, 3.0, -2.0])
ERA = torch.tensor([0.5, -1.0, -0.5, 0.0, 1.0, -2.0, 0.25, -0.5])
BASE = VerlBaselines(er=10.0, erv=1.0, era=-0.5, steps=1)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _rel(x: float, m: float) -> float:
    return max(-5.0, min(5.0, (x - m) / (abs(m) + 1e-8)))


def _expected(adv: list[float], base: VerlBaselines, gating: str, c: float = 1.0, g: float = 2.0, kappa: float = 2.0) -> list[float]:
    """The METHODS.md §3 formulas, written out in plain python."""
    out = []
    for a, er, erv, era in zip(adv, ER.tolist(), ERV.tolist(), ERA.tolist()):
        r_er, r_erv, r_era = _rel(er, base.er), _rel(erv, base.erv), _rel(era, base.era)
        if gating == "era":
            tau = _sigmoid(g * r_era)
            aux = c * (tau * math.tanh(r_er) + (1 - tau) * math.tanh(r_erv))
        elif gating == "fixed_half":
            aux = c * (0.5 * math.tanh(r_er) + 0.5 * math.tanh(r_erv))
        else:
            aux = c * (math.tanh(r_er) + math.tanh(r_erv))
        out.append(a + min(max(aux, 0.0), abs(a) / kappa))
    return out


def test_shaping_by_hand_single_responses() -> None:
    adv = group_advantages(REWARDS, GROUP)
    a = adv[0].item()  # 0.5 / (sqrt(1/3) + 1e-6)
    shaped, info = verl_shape(VerlInputs(adv, ER, ERV, ERA), BASE, VerlConfig())
    # Response 0: rel_ER = 0.2, rel_ERV = 0.5, rel_ERA = (0.5 + 0.5)/0.5 = 2 -> τ = sigmoid(4).
    tau = 1 / (1 + math.exp(-4))
    aux = tau * math.tanh(0.2) + (1 - tau) * math.tanh(0.5)
    assert info["tau"][0].item() == pytest.approx(tau, rel=1e-6)
    assert shaped[0].item() == pytest.approx(a + aux, rel=1e-6)  # aux ≈ 0.202 < |Â|/2 ≈ 0.433
    # Response 3: rel_ER = 0.5, rel_ERV = 1, rel_ERA = 1 -> aux ≈ 0.498 > |Â|/2: the cap binds.
    tau3 = 1 / (1 + math.exp(-2))
    aux3 = tau3 * math.tanh(0.5) + (1 - tau3) * math.tanh(1.0)
    assert aux3 > a / 2
    assert shaped[3].item() == pytest.approx(a + a / 2, rel=1e-6)
    # Response 7: rel_ER = 7 is clamped to 5.
    assert info["rel_er"][7].item() == 5.0
    # Group 1's Â: [1/3, 1/3, 1/3, −1] / (std + ε) — response 4 has rel_ERA = 3, ERV rel = −1.
    assert info["rel_era"][4].item() == pytest.approx(3.0)


@pytest.mark.parametrize("gating", ["era", "fixed_half", "sum"])
def test_shaping_all_gating_modes(gating: str) -> None:
    adv = group_advantages(REWARDS, GROUP)
    shaped, _ = verl_shape(VerlInputs(adv, ER, ERV, ERA), BASE, VerlConfig(gating=gating))
    torch.testing.assert_close(shaped, torch.tensor(_expected(adv.tolist(), BASE, gating)), rtol=1e-6, atol=1e-6)
    assert bool((shaped >= adv).all())  # the bonus is never negative
    assert bool((shaped - adv <= adv.abs() / 2 + 1e-7).all())  # and capped at |Â|/κ


def test_gating_modes_differ_and_coef_gain_kappa_matter() -> None:
    adv = group_advantages(REWARDS, GROUP)
    results = {g: verl_shape(VerlInputs(adv, ER, ERV, ERA), BASE, VerlConfig(gating=g))[0] for g in ("era", "fixed_half", "sum")}
    assert not torch.allclose(results["era"], results["fixed_half"])
    assert not torch.allclose(results["sum"], results["fixed_half"])
    custom = verl_shape(VerlInputs(adv, ER, ERV, ERA), BASE, VerlConfig(coef=0.3, gain=0.5, kappa=4.0))[0]
    expected = _expected(adv.tolist(), BASE, "era", c=0.3, g=0.5, kappa=4.0)
    torch.testing.assert_close(custom, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_zero_advantage_gets_no_bonus() -> None:
    adv = torch.zeros(8)
    shaped, _ = verl_shape(VerlInputs(adv, ER, ERV, ERA), BASE, VerlConfig(gating="sum"))
    assert torch.equal(shaped, adv)


def test_last_token_vs_all_tokens() -> None:
    adv = torch.tensor([1.0, -2.0, 0.5])
    shaped = torch.tensor([1.4, -1.5, 0.7])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False, False, False, False]])
    every = verl_token_advantages(adv, shaped, mask, "all_tokens")
    last = verl_token_advantages(adv, shaped, mask, "last_token")
    torch.testing.assert_close(every, torch.tensor([[1.4, 1.4, 1.4, 0.0], [-1.5, 0.0, 0.0, 0.0], [0.0] * 4]))
    torch.testing.assert_close(last, torch.tensor([[1.0, 1.0, 1.4, 0.0], [-1.5, 0.0, 0.0, 0.0], [0.0] * 4]))
    assert every.dtype == torch.float32 and last.dtype == torch.float32


def test_last_token_respects_left_padding() -> None:
    mask = torch.tensor([[False, True, True, False]])
    last = verl_token_advantages(torch.tensor([1.0]), torch.tensor([2.0]), mask, "last_token")
    torch.testing.assert_close(last, torch.tensor([[0.0, 1.0, 2.0, 0.0]]))


def test_first_step_is_not_shaped_and_ema_updates_after_the_step() -> None:
    cfg = VerlConfig()
    shaper = VerlShaper(cfg)
    mask = torch.ones(8, 3, dtype=torch.bool)
    adv = group_advantages(REWARDS, GROUP)

    tok1, info1 = shaper.shape(VerlInputs(adv, ER, ERV, ERA), mask)
    assert torch.equal(tok1, adv[:, None].expand(8, 3))
    assert info1["verl_first_step"] == 1.0
    m1 = VerlBaselines(
        er=0.3 * ER.mean().item(), erv=0.3 * ERV.mean().item(), era=0.3 * ERA.mean().item(), steps=1
    )
    assert shaper.baselines.er == pytest.approx(m1.er, rel=1e-6)
    assert shaper.baselines.erv == pytest.approx(m1.erv, rel=1e-6)
    assert shaper.baselines.era == pytest.approx(m1.era, rel=1e-6)
    assert shaper.baselines.steps == 1

    # Step 2 uses the baselines from step 1 only (not step 2's own means).
    er2, erv2, era2 = ER * 1.5, ERV - 0.5, ERA + 0.25
    tok2, info2 = shaper.shape(VerlInputs(adv, er2, erv2, era2), mask)
    assert info2["verl_first_step"] == 0.0
    assert info2["verl_m_er"] == pytest.approx(m1.er, rel=1e-6)
    expected2, _ = verl_shape(VerlInputs(adv, er2, erv2, era2), shaper_baselines_after(m1), cfg)
    torch.testing.assert_close(tok2, expected2[:, None].expand(8, 3))
    assert shaper.baselines.er == pytest.approx(0.7 * m1.er + 0.3 * er2.mean().item(), rel=1e-6)
    assert shaper.baselines.steps == 2


def shaper_baselines_after(m: VerlBaselines) -> VerlBaselines:
    return VerlBaselines(er=m.er, erv=m.erv, era=m.era, reward_ema=0.0, steps=m.steps)


def test_performance_scaling() -> None:
    cfg = VerlConfig(performance_scaling=True)
    shaper = VerlShaper(cfg)
    mask = torch.ones(8, 2, dtype=torch.bool)
    adv = group_advantages(REWARDS, GROUP)
    shaper.shape(VerlInputs(adv, ER, ERV, ERA, rewards=REWARDS), mask)
    # mean reward 5/8 -> 2·0.625 − 1 = 0.25 -> ē = 0.3·0.25 = 0.075.
    assert shaper.baselines.reward_ema == pytest.approx(0.075, rel=1e-6)
    used = shaper.baselines
    tok, info = shaper.shape(VerlInputs(adv, ER, ERV, ERA, rewards=REWARDS), mask)
    c = 1.0 * (1 - (0.075 + 1) / 2)  # 0.4625
    assert info["verl_coef"] == pytest.approx(c, rel=1e-6)
    expected = _expected(adv.tolist(), used, "era", c=c)
    torch.testing.assert_close(tok[:, 0], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="performance_scaling"):
        VerlShaper(cfg).shape(VerlInputs(adv, ER, ERV, ERA), mask)


def test_reward_range_mapping() -> None:
    cfg = VerlConfig(reward_min=-1.0, reward_max=1.0)
    b = verl_update_baselines(VerlBaselines(), ER, ERV, ERA, cfg, rewards=torch.full((8,), 0.5))
    assert b.reward_ema == pytest.approx(0.3 * 0.5)


def test_float32_throughout() -> None:
    adv = group_advantages(REWARDS, GROUP).to(torch.bfloat16)
    shaped, _ = verl_shape(VerlInputs(adv, ER.to(torch.bfloat16), ERV.double(), ERA.half()), BASE, VerlConfig())
    assert shaped.dtype == torch.float32
    b = verl_update_baselines(BASE, ER.double(), ERV.double(), ERA.double(), VerlConfig())
    assert b.er == float(torch.tensor(b.er, dtype=torch.float32))  # stored values are float32 numbers


def test_state_dict_round_trip_continues_exactly() -> None:
    cfg = VerlConfig(performance_scaling=True, apply_to="last_token")
    mask = torch.tensor([[True, True, False]] * 8)
    adv = group_advantages(REWARDS, GROUP)
    steps = [(ER * (1 + 0.1 * k), ERV + 0.3 * k, ERA - 0.2 * k, REWARDS.roll(k)) for k in range(3)]

    full = VerlShaper(cfg)
    outs = [full.shape(VerlInputs(adv, *s[:3], rewards=s[3]), mask)[0] for s in steps]

    first = VerlShaper(cfg)
    for s in steps[:2]:
        first.shape(VerlInputs(adv, *s[:3], rewards=s[3]), mask)
    resumed = VerlShaper(cfg)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict()
    out3, _ = resumed.shape(VerlInputs(adv, *steps[2][:3], rewards=steps[2][3]), mask)
    assert torch.equal(out3, outs[2])
    assert not torch.equal(outs[2], adv[:, None].expand(8, 3) * mask)  # shaping really happened
    with pytest.raises(ValueError, match="keys"):
        resumed.load_state_dict({"er": 0.0})


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="era"):
        verl_shape(VerlInputs(torch.zeros(8), ER, ERV, ERA[:4]), BASE, VerlConfig())
    with pytest.raises(ValueError, match="er has a non-finite"):
        verl_shape(VerlInputs(torch.zeros(8), ER * float("nan"), ERV, ERA), BASE, VerlConfig())
    with pytest.raises(ValueError, match=r"verl\.ema_rate"):
        VerlConfig(ema_rate=0.0)
    with pytest.raises(ValueError, match=r"verl\.gating"):
        VerlConfig(gating="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"verl\.apply_to"):
        VerlConfig(apply_to="first_token")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"verl\.kappa"):
        VerlConfig(kappa=0.0)
    with pytest.raises(ValueError, match=r"verl\.reward_max"):
        VerlConfig(reward_min=1.0, reward_max=1.0)
