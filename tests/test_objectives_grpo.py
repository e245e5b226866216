"""GRPO advantages, the clipped surrogate, token-mean aggregation and the k3 KL (METHODS.md §0, §3)."""

from __future__ import annotations

import math

import pytest
import torch

from latentx.objectives import GRPOConfig, PolicyBatch, clipped_surrogate, group_advantages, grpo_loss, k3_kl


def test_group_advantages_known_group_unbiased_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, group)
    std = math.sqrt((4 * 0.25) / 3)  # unbiased (n - 1) std of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)


def test_group_advantages_three_values_and_non_contiguous_groups() -> None:
    rewards = torch.tensor([0.0, 5.0, 1.0, 5.0, 2.0])
    group = torch.tensor([7, 3, 7, 3, 7])  # group 7: [0, 1, 2] -> mean 1, std 1; group 3: all equal
    adv = group_advantages(rewards, group)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0]) / (1 + 1e-6))


def test_group_advantages_all_equal_and_singleton_give_zero_not_nan() -> None:
    adv = group_advantages(torch.tensor([0.3, 0.3, 0.3, 2.0]), torch.tensor([0, 0, 0, 1]))
    assert torch.equal(adv, torch.zeros(4))


def test_group_advantages_dr_grpo_no_std_division() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0]), std_normalize=False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_group_advantages_bad_input() -> None:
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.zeros(2), torch.zeros(2))


def test_clipped_surrogate_inside_and_outside_the_clip_range() -> None:
    ratios = torch.tensor([[1.0, 1.5, 0.5, 0.5, 1.5, 1.1]])
    adv = torch.tensor([[2.0, 1.0, 1.0, -1.0, -1.0, 1.0]])
    old = torch.full((1, 6), -1.0)
    logp = (old + ratios.log()).requires_grad_()
    mask = torch.ones(1, 6, dtype=torch.bool)
    per_token, stats = clipped_surrogate(logp, old, adv, mask, 0.2, 0.2)
    # -min(ρA, clip(ρ)A): ρ=1 A=2 -> -2; ρ=1.5 A=1 -> -1.2 (clipped); ρ=0.5 A=1 -> -0.5;
    # ρ=0.5 A=-1 -> 0.8 (clipped); ρ=1.5 A=-1 -> 1.5; ρ=1.1 A=1 -> -1.1.
    torch.testing.assert_close(per_token, torch.tensor([[-2.0, -1.2, -0.5, 0.8, 1.5, -1.1]]))
    assert stats["clip_frac"].item() == pytest.approx(2 / 6)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 6)
    per_token.sum().backward()
    # d/dlogp (-Aρ) = -Aρ on the unclipped branch, 0 where the clip is active.
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, 0.0, -0.5, 0.0, 1.5, -1.1]]))


def test_clipped_surrogate_asymmetric_clip_high() -> None:
    old = torch.zeros(1, 1)
    logp = torch.tensor([[math.log(1.25)]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    wide, _ = clipped_surrogate(logp, old, torch.ones(1, 1), mask, 0.2, 0.28)
    narrow, _ = clipped_surrogate(logp, old, torch.ones(1, 1), mask, 0.2, 0.2)
    assert wide.item() == pytest.approx(-1.25)
    assert narrow.item() == pytest.approx(-1.2)


def test_grpo_loss_is_a_global_token_mean_with_k3_kl() -> None:
    # Two responses of 3 and 1 tokens; ratio 1 everywhere, so the per-token pg loss is -A.
    old = torch.full((2, 3), -2.0)
    logp = old.clone().requires_grad_()
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -1.0])
    ref = old + 0.5  # δ = 0.5 on every token
    batch = PolicyBatch(logp=logp, old_logp=old, mask=mask, advantages=adv, group=torch.tensor([0, 0]), ref_logp=ref)
    out = grpo_loss(batch, GRPOConfig(kl_coef=0.1))
    pg = (-1.0 * 3 + 1.0 * 1) / 4  # token mean (a per-sequence mean would give 0)
    k3 = math.exp(0.5) - 0.5 - 1
    assert out.terms["pg"] == pytest.approx(pg)
    assert out.terms["kl"] == pytest.approx(k3, rel=1e-6)
    assert out.loss.item() == pytest.approx(pg + 0.1 * k3, rel=1e-6)
    assert out.terms["tokens"] == 4.0
    out.loss.backward()
    # gradient per valid token: (-A·ρ + 0.1·(1 - e^δ)) / 4
    g_kl = 0.1 * (1 - math.exp(0.5))
    expected = torch.tensor([[-1 + g_kl, -1 + g_kl, -1 + g_kl], [1 + g_kl, 0.0, 0.0]]) / 4
    torch.testing.assert_close(logp.grad, expected)


def test_k3_kl_values() -> None:
    logp = torch.tensor([0.0, -1.0, -2.0])
    ref = torch.tensor([0.0, -0.5, -3.0])
    delta = ref - logp
    torch.testing.assert_close(k3_kl(logp, ref), torch.exp(delta) - delta - 1)
    assert k3_kl(logp, ref)[0].item() == 0.0
    assert bool((k3_kl(logp, ref) >= 0).all())


def test_kl_coef_without_reference_is_an_error() -> None:
    batch = PolicyBatch(
        logp=torch.zeros(1, 2),
        old_logp=torch.zeros(1, 2),
        mask=torch.ones(1, 2, dtype=torch.bool),
        advantages=torch.zeros(1),
        group=torch.zeros(1, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="grpo.kl_coef"):
        grpo_loss(batch, GRPOConfig(kl_coef=0.1))


def test_grpo_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"grpo\.clip_low must be >= 0"):
        GRPOConfig(clip_low=-0.1)
    # clip_low = 1 (ratio clipped below at 0) is the ReLaX authors' range [0, 2] (issue 17): allowed now.
    assert GRPOConfig(clip_low=1.0).clip_low == 1.0
    with pytest.raises(ValueError, match=r"grpo\.clip_low must be <= 1"):
        GRPOConfig(clip_low=1.5)
    with pytest.raises(ValueError, match=r"grpo\.dual_clip"):
        GRPOConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match=r"grpo\.kl_coef"):
        GRPOConfig(kl_coef=-1.0)
    with pytest.raises(ValueError, match=r"grpo\.advantage_std"):
        GRPOConfig(advantage_std="no")  # type: ignore[arg-type]


def test_extreme_log_ratios_do_not_overflow() -> None:
    # A rollout log-prob of −1e4 would make ρ = e^{1e4} = inf; with Â = 0 that is 0·inf = NaN unclamped.
    old = torch.tensor([[-1e4, -1.0], [-1.0, -1e4]])
    logp = torch.tensor([[-1.0, -1e4], [-1.0, -1.0]], requires_grad=True)
    batch = PolicyBatch(
        logp=logp,
        old_logp=old,
        mask=torch.ones(2, 2, dtype=torch.bool),
        advantages=torch.tensor([0.0, -1.0]),
        group=torch.tensor([0, 0]),
        ref_logp=torch.full((2, 2), -1.0),
    )
    out = grpo_loss(batch, GRPOConfig(kl_coef=0.1))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
