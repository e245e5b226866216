"""PolicyBatch validation, empty responses, garbage in the padding, and the Objective dispatch."""

from __future__ import annotations

import pytest
import torch

from latentx.objectives import (
    CONFIGS,
    OBJECTIVES,
    ClipCovConfig,
    EntropyBonusConfig,
    GRPOConfig,
    KLCovConfig,
    Objective,
    PolicyBatch,
    RelaxConfig,
    VerlConfig,
    masked_mean,
)


def _batch(B: int = 4, T: int = 5, mask: torch.Tensor | None = None, **over: object) -> PolicyBatch:
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(B, T, generator=g) * 2).requires_grad_()
    fields: dict[str, object] = dict(
        logp=logp,
        old_logp=logp.detach() + 0.1 * torch.randn(B, T, generator=g),
        mask=torch.ones(B, T, dtype=torch.bool) if mask is None else mask,
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5])[:B],
        group=torch.tensor([0, 0, 1, 1])[:B],
        ref_logp=logp.detach() - 0.2,
        entropy=torch.rand(B, T, generator=g).requires_grad_(),
        dsd=(torch.rand(B, generator=g) * 40).requires_grad_(),
    )
    fields.update(over)
    return PolicyBatch(**fields)  # type: ignore[arg-type]


def _objectives() -> list[Objective]:
    return [
        Objective("grpo", grpo=GRPOConfig(kl_coef=0.05)),
        Objective("relax", config=RelaxConfig(alpha=0.5, beta=0.5, xi=10.0)),
        Objective("relax", config=RelaxConfig(kl_set="code", lme_scope="microbatch", xi=10.0)),
        Objective("verl"),
        Objective("entropy_bonus", config=EntropyBonusConfig(coef=0.1)),
        Objective("kl_cov", config=KLCovConfig(k_ratio=0.5)),
        Objective("clip_cov", config=ClipCovConfig(ratio=0.5, cov_low=-10.0, cov_high=10.0)),
    ]


@pytest.mark.parametrize("objective", _objectives(), ids=lambda o: o.name)
def test_empty_responses_and_padding_garbage_give_no_nan(objective: Objective) -> None:
    mask = torch.tensor(
        [[True, True, True, False, False], [False] * 5, [True, False, False, False, False], [True] * 5]
    )
    batch = _batch(mask=mask)
    with torch.no_grad():  # garbage in the padding must never be read
        for t in (batch.logp, batch.old_logp, batch.ref_logp, batch.entropy):
            t[~mask] = float("nan")  # type: ignore[index]
        batch.old_logp[1, 0] = float("-inf")
    out = objective.loss(batch)
    assert torch.isfinite(out.loss)
    assert all(v == v for v in out.terms.values())
    out.loss.backward()
    assert torch.isfinite(batch.logp.grad).all()
    assert bool((batch.logp.grad[~mask] == 0).all())
    assert out.terms["tokens"] == 9.0


@pytest.mark.parametrize("objective", _objectives(), ids=lambda o: o.name)
def test_all_responses_empty_gives_zero_token_loss(objective: Objective) -> None:
    mask = torch.zeros(4, 5, dtype=torch.bool)
    batch = _batch(mask=mask)
    out = objective.loss(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert bool((batch.logp.grad == 0).all())
    assert out.terms["pg"] == 0.0
    if objective.name != "relax":  # relax keeps L_xp, a response-level term, over the empty responses
        assert out.loss.item() == 0.0


def test_masked_mean_of_nothing_is_zero() -> None:
    x = torch.tensor([[float("nan"), 2.0]])
    assert masked_mean(x, torch.tensor([[False, False]])).item() == 0.0
    assert masked_mean(x, torch.tensor([[False, True]])).item() == 2.0
    assert masked_mean(x, torch.tensor([[False, True]]), dim=1).tolist() == [2.0]


def test_batch_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="batch.old_logp"):
        _batch(old_logp=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="batch.mask must be a bool"):
        _batch(mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="batch.advantages"):
        _batch(advantages=torch.zeros(3))
    with pytest.raises(ValueError, match="batch.group must be an integer"):
        _batch(group=torch.zeros(4))
    with pytest.raises(ValueError, match="batch.dsd"):
        _batch(dsd=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="batch.entropy"):
        _batch(entropy=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="batch.logp must be a \\[B, T\\]"):
        _batch(logp=torch.zeros(4))
    with pytest.raises(ValueError, match="batch.logp has a non-finite value"):
        _batch(logp=torch.full((4, 5), float("nan")))
    with pytest.raises(ValueError, match="batch.advantages has a non-finite"):
        _batch(advantages=torch.tensor([1.0, float("inf"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="batch.dsd has a non-finite"):
        _batch(dsd=torch.tensor([1.0, float("nan"), 0.0, 0.0]))


def test_token_advantages_accepts_b_and_bt() -> None:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    b = _batch(B=2, T=3, mask=mask, advantages=torch.tensor([2.0, -1.0]), entropy=None, ref_logp=None, dsd=None)
    assert b.token_advantages().tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    bt = _batch(B=2, T=3, mask=mask, advantages=torch.tensor([[1.0, 3.0, 9.0], [-1.0, 5.0, 5.0]]), entropy=None, ref_logp=None, dsd=None)
    assert bt.token_advantages().tolist() == [[1.0, 3.0, 0.0], [-1.0, 0.0, 0.0]]
    assert bt.response_advantages().tolist() == [2.0, -1.0]


def test_objective_registry_needs_and_errors() -> None:
    assert set(OBJECTIVES) == {"grpo", "relax", "verl", "entropy_bonus", "kl_cov", "clip_cov"}
    assert set(CONFIGS) == set(OBJECTIVES)
    assert Objective("grpo").needs == frozenset()
    assert Objective("grpo", grpo=GRPOConfig(kl_coef=0.1)).needs == frozenset({"ref"})
    assert Objective("relax").needs == frozenset({"dsd_grad", "ref"})
    assert Objective("relax", config=RelaxConfig(beta=0.0)).needs == frozenset({"dsd_grad"})
    assert Objective("verl").needs == frozenset({"rank"})
    assert Objective("kl_cov").needs == frozenset()
    with pytest.raises(ValueError, match="objective name"):
        Objective("ppo")
    with pytest.raises(ValueError, match="RelaxConfig"):
        Objective("relax", config=VerlConfig())
    with pytest.raises(ValueError, match="shape_advantages"):
        Objective("grpo").shape_advantages(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="state is for objective"):
        Objective("verl").load_state_dict({"name": "grpo"})


def test_objective_advantages_follow_the_grpo_config() -> None:
    rewards, group = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long)
    dr = Objective("grpo", grpo=GRPOConfig(advantage_std=False)).advantages(rewards, group)
    assert dr.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    std = Objective("grpo").advantages(rewards, group)
    assert std[0].item() == pytest.approx(0.75 / 0.5, rel=1e-5)  # unbiased std of [1, 0, 0, 0] is 0.5


def test_verl_objective_end_to_end_with_state() -> None:
    objective = Objective("verl", config=VerlConfig(apply_to="last_token"))
    mask = torch.ones(4, 5, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    er, erv, era = torch.tensor([5.0, 6.0, 7.0, 8.0]), torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.0, 0.1, -0.1, 0.2])
    first, _ = objective.shape_advantages(adv, er, erv, era, mask)
    assert torch.equal(first, adv[:, None].expand(4, 5))
    saved = objective.state_dict()
    second, info = objective.shape_advantages(adv, er * 2, erv * 2, era * 2, mask)
    assert info["verl_bonus_mean"] > 0
    assert torch.equal(second[:, :4], first[:, :4]) and not torch.equal(second[:, 4], first[:, 4])
    objective.load_state_dict(saved)
    assert torch.equal(objective.shape_advantages(adv, er * 2, erv * 2, era * 2, mask)[0], second)
    out = objective.loss(_batch(advantages=second))
    assert torch.isfinite(out.loss)
