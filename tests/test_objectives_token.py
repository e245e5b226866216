"""Token-level baselines: entropy bonus (fixed and adaptive), KL-Cov, Clip-Cov (METHODS.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from latentx.objectives import (
    ClipCovConfig,
    EntropyBonusConfig,
    EntropyCoefController,
    GRPOConfig,
    KLCovConfig,
    Objective,
    PolicyBatch,
    clip_cov_loss,
    clip_cov_select,
    entropy_bonus_loss,
    grpo_loss,
    kl_cov_loss,
    kl_cov_select,
)
from latentx.objectives.clip_cov import clip_cov_candidates

# ----------------------------------------------------------------------------------------------- entropy


def _categorical_batch(logits: torch.Tensor, tokens: torch.Tensor, adv: float) -> PolicyBatch:
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    B, T = tokens.shape
    return PolicyBatch(
        logp=logp,
        old_logp=logp.detach(),
        mask=torch.ones(B, T, dtype=torch.bool),
        advantages=torch.full((B,), adv),
        group=torch.zeros(B, dtype=torch.long),
        entropy=entropy,
    )


def test_entropy_bonus_value_and_sign() -> None:
    logits = torch.tensor([[[4.0, 0.0, -1.0, 0.5], [0.0, 3.0, 0.0, 0.0]]], requires_grad=True)
    tokens = torch.tensor([[0, 1]])
    batch = _categorical_batch(logits, tokens, adv=0.0)
    out = entropy_bonus_loss(batch, EntropyBonusConfig(coef=0.5), GRPOConfig())
    h = batch.entropy.mean().item()  # type: ignore[union-attr]
    assert out.terms["entropy"] == pytest.approx(h, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.0 - 0.5 * h, rel=1e-6)
    out.loss.backward()
    with torch.no_grad():  # one gradient-descent step raises the entropy
        stepped = logits - 1.0 * logits.grad
    after = _categorical_batch(stepped, tokens, adv=0.0).entropy.mean().item()  # type: ignore[union-attr]
    assert after > h


def test_entropy_bonus_needs_entropy() -> None:
    batch = PolicyBatch(
        logp=torch.zeros(1, 2),
        old_logp=torch.zeros(1, 2),
        mask=torch.ones(1, 2, dtype=torch.bool),
        advantages=torch.zeros(1),
        group=torch.zeros(1, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="batch.entropy"):
        entropy_bonus_loss(batch, EntropyBonusConfig(), GRPOConfig())


def test_adaptive_coefficient_moves_toward_the_target() -> None:
    cfg = EntropyBonusConfig(coef=0.01, adaptive=True, target_entropy=0.5, coef_lr=0.005, coef_min=0.0, coef_max=0.02)
    ctl = EntropyCoefController(cfg)
    assert ctl.coef_to_apply() == 0.0  # no measurement yet
    ctl.observe(entropy_sum=0.2 * 10, token_count=10)  # entropy 0.2 < target: push entropy up
    assert ctl.step() == pytest.approx(0.015)
    assert ctl.coef_to_apply() == pytest.approx(0.015)
    ctl.observe(0.3 * 4, 4)
    assert ctl.step() == pytest.approx(0.02)
    ctl.observe(0.3 * 4, 4)
    assert ctl.step() == pytest.approx(0.02)  # clipped at coef_max
    ctl.observe(0.9 * 4, 4)  # entropy above target: back off, and do not apply the bonus
    assert ctl.step() == pytest.approx(0.015)
    assert ctl.coef_to_apply() == 0.0
    for _ in range(5):
        ctl.observe(0.9, 1)
        ctl.step()
    assert ctl.coef == 0.0  # clipped at coef_min


def test_adaptive_entropy_is_token_weighted_over_the_step() -> None:
    cfg = EntropyBonusConfig(coef=0.1, adaptive=True, target_entropy=0.5, coef_lr=0.01)
    ctl = EntropyCoefController(cfg)
    ctl.observe(0.1 * 4, 4)  # micro-batch 1: 4 tokens at 0.1
    ctl.observe(2.0 * 1, 1)  # micro-batch 2: 1 token at 2.0 -> token mean 0.48 (mean of means 1.05)
    assert ctl.step() == pytest.approx(0.11)
    assert ctl.last_entropy == pytest.approx(0.48)


def test_objective_drives_the_adaptive_controller_and_round_trips() -> None:
    cfg = EntropyBonusConfig(coef=0.05, adaptive=True, target_entropy=5.0, coef_lr=0.01)
    objective = Objective("entropy_bonus", config=cfg)
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    batch = _categorical_batch(logits, torch.zeros(2, 3, dtype=torch.long), adv=1.0)
    assert objective.needs == frozenset({"entropy"})
    assert objective.loss(batch).terms["entropy_coef"] == 0.0
    assert objective.on_optimizer_step() == {"entropy_coef": pytest.approx(0.06)}  # log 4 < 5
    saved = objective.state_dict()
    assert objective.loss(batch).terms["entropy_coef"] == pytest.approx(0.06)
    other = Objective("entropy_bonus", config=cfg)
    other.load_state_dict(saved)
    assert other.entropy_controller.state_dict() == saved["entropy_bonus"]  # type: ignore[union-attr]
    assert other.loss(batch).terms["entropy_coef"] == pytest.approx(0.06)


def test_entropy_config_validation() -> None:
    with pytest.raises(ValueError, match=r"entropy_bonus\.target_entropy"):
        EntropyBonusConfig(adaptive=True)
    with pytest.raises(ValueError, match=r"entropy_bonus\.coef must be >= 0"):
        EntropyBonusConfig(coef=-0.1)
    with pytest.raises(ValueError, match=r"entropy_bonus\.coef_max"):
        EntropyBonusConfig(coef_min=0.5, coef_max=0.1)


# ----------------------------------------------------------------------------------------------- KL-Cov

KL_LOGP = torch.tensor([[-0.5, -2.0, -1.0, 0.0], [-3.0, -0.2, -1.5, -0.7]])
KL_MASK = torch.tensor([[True, True, True, False], [True, True, True, True]])
KL_ADV = torch.tensor([1.0, -1.0])


def _kl_cov_by_hand() -> dict[tuple[int, int], float]:
    cells = [(b, t) for b in range(2) for t in range(4) if KL_MASK[b, t]]
    logp = {c: KL_LOGP[c].item() for c in cells}
    adv = {c: KL_ADV[c[0]].item() for c in cells}
    mean_logp = sum(logp.values()) / len(cells)
    mean_adv = sum(adv.values()) / len(cells)
    return {c: (logp[c] - mean_logp) * (adv[c] - mean_adv) for c in cells}


def test_kl_cov_selects_the_largest_covariance_tokens() -> None:
    cov = _kl_cov_by_hand()
    ranked = sorted(cov, key=cov.get, reverse=True)  # type: ignore[arg-type]
    assert ranked[:2] == [(1, 0), (0, 0)]  # cov ≈ 1.48 and 0.88
    adv_tok = KL_ADV[:, None].expand(2, 4)
    two = kl_cov_select(KL_LOGP, adv_tok, KL_MASK, k_ratio=0.3)  # ⌊0.3·7⌋ = 2
    assert sorted(map(tuple, two.nonzero().tolist())) == [(0, 0), (1, 0)]
    one = kl_cov_select(KL_LOGP, adv_tok, KL_MASK, k_ratio=0.0002)  # ⌊0.0014⌋ = 0 -> at least one token
    assert one.nonzero().tolist() == [[1, 0]]
    assert not kl_cov_select(KL_LOGP, adv_tok, KL_MASK, k_ratio=0.0).any()
    # Padding never selected even if its logp is extreme.
    padded = KL_LOGP.clone()
    padded[0, 3] = 50.0
    assert not kl_cov_select(padded, adv_tok, KL_MASK, k_ratio=1.0)[0, 3]


def _kl_batch(old_shift: torch.Tensor) -> PolicyBatch:
    return PolicyBatch(
        logp=KL_LOGP.clone().requires_grad_(),
        old_logp=KL_LOGP - old_shift,
        mask=KL_MASK,
        advantages=KL_ADV,
        group=torch.tensor([0, 0]),
    )


def test_kl_cov_loss_by_hand() -> None:
    batch = _kl_batch(torch.full((2, 4), 0.05))  # ρ = e^0.05 on every token, inside the clip range
    out = kl_cov_loss(batch, KLCovConfig(k_ratio=0.3, coef=2.0), GRPOConfig())
    rho = math.exp(0.05)
    # −Aρ summed: 3 tokens with A=1, 4 with A=−1; + 2·|0.05| on the 2 selected tokens; token mean over 7.
    assert out.loss.item() == pytest.approx((-3 * rho + 4 * rho + 2 * 2.0 * 0.05) / 7, rel=1e-6)
    assert out.terms["kl_cov_selected"] == 2.0
    assert out.terms["kl_cov_abs_kl"] == pytest.approx(0.05, rel=1e-5)
    out.loss.backward()
    grad = batch.logp.grad
    assert grad[1, 0].item() == pytest.approx((rho + 2.0) / 7, rel=1e-6)  # −Aρ + c·sign(logp − old)
    assert grad[1, 1].item() == pytest.approx(rho / 7, rel=1e-6)
    assert grad[0, 0].item() == pytest.approx((-rho + 2.0) / 7, rel=1e-6)


def test_kl_cov_unselected_tokens_keep_the_clip_unless_asked() -> None:
    shift = torch.full((2, 4), 0.05)
    shift[1, 1] = -0.5  # ρ = e^−0.5 with A = −1: the clipped branch (0.8) is active, token unselected
    batch = _kl_batch(shift)
    clipped = kl_cov_loss(batch, KLCovConfig(k_ratio=0.3), GRPOConfig())
    verl_like = kl_cov_loss(batch, KLCovConfig(k_ratio=0.3, clip_unselected=False), GRPOConfig())
    assert clipped.loss.item() - verl_like.loss.item() == pytest.approx((0.8 - math.exp(-0.5)) / 7, rel=1e-5)
    none = kl_cov_loss(batch, KLCovConfig(k_ratio=0.0), GRPOConfig())
    assert none.loss.item() == pytest.approx(grpo_loss(batch, GRPOConfig()).loss.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- Clip-Cov

CC_LOGP = torch.tensor([[-0.2, -0.5, -2.0, -1.0], [-3.0, -0.4, -1.2, -2.5]])
CC_ADV = torch.tensor([3.0, -3.0])
# mean logp = −1.35, mean Â = 0: cov = [[3.45, 2.55, −1.95, 1.05], [4.95, −2.85, 0.45, 3.45]]
CC_BAND = {(0, 0), (0, 1), (0, 3), (1, 0), (1, 3)}


def _cc_batch(old: torch.Tensor | None = None) -> PolicyBatch:
    return PolicyBatch(
        logp=CC_LOGP.clone().requires_grad_(),
        old_logp=CC_LOGP.clone() if old is None else old,
        mask=torch.ones(2, 4, dtype=torch.bool),
        advantages=CC_ADV,
        group=torch.tensor([0, 0]),
    )


def _cells(selected: torch.Tensor) -> set[tuple[int, int]]:
    return {(b, t) for b, t in selected.nonzero().tolist()}


def test_clip_cov_detaches_only_tokens_in_the_band() -> None:
    batch = _cc_batch()
    out = clip_cov_loss(batch, ClipCovConfig(ratio=1.0), GRPOConfig(), generator=torch.Generator().manual_seed(0))
    assert out.terms["clip_cov_candidates"] == 5.0
    assert out.terms["clip_cov_detached"] == 5.0
    assert out.loss.item() == pytest.approx(grpo_loss(_cc_batch(), GRPOConfig()).loss.item())  # value unchanged
    out.loss.backward()
    zero_grad = {(b, t) for b in range(2) for t in range(4) if batch.logp.grad[b, t] == 0.0}  # type: ignore[index]
    assert zero_grad == CC_BAND
    assert batch.logp.grad[0, 2].item() == pytest.approx(-3.0 / 8)  # −Aρ/N on a kept token


def _detached(logp, old_logp, adv_tok, mask, cfg, clip, generator=None):
    """Clip-Cov's detached tokens: a random subset of the candidates."""
    return clip_cov_select(clip_cov_candidates(logp, old_logp, adv_tok, mask, cfg, clip), mask, cfg, generator)


def test_clip_cov_band_edges_come_from_the_config() -> None:
    adv_tok = CC_ADV[:, None].expand(2, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    narrow = ClipCovConfig(ratio=1.0, cov_low=1.0, cov_high=3.0)
    assert _cells(_detached(CC_LOGP, CC_LOGP, adv_tok, mask, narrow, GRPOConfig())) == {(0, 1), (0, 3)}
    low = ClipCovConfig(ratio=1.0, cov_low=-2.0, cov_high=0.5)
    assert _cells(_detached(CC_LOGP, CC_LOGP, adv_tok, mask, low, GRPOConfig())) == {(0, 2), (1, 2)}


def test_clip_cov_budget_and_generator() -> None:
    cfg, clip = ClipCovConfig(), GRPOConfig()  # ratio 0.0002 of 8 tokens -> budget max(1, 0) = 1
    adv_tok = CC_ADV[:, None].expand(2, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    picks = []
    for seed in range(20):
        sel = _detached(CC_LOGP, CC_LOGP, adv_tok, mask, cfg, clip, torch.Generator().manual_seed(seed))
        assert len(_cells(sel)) == 1 and _cells(sel) <= CC_BAND
        again = _detached(CC_LOGP, CC_LOGP, adv_tok, mask, cfg, clip, torch.Generator().manual_seed(seed))
        assert torch.equal(sel, again)
        picks.append(next(iter(_cells(sel))))
    assert len(set(picks)) > 1  # really random
    assert not _detached(CC_LOGP, CC_LOGP, adv_tok, mask, ClipCovConfig(ratio=0.0), clip).any()


def test_clip_cov_skips_tokens_the_clip_already_cuts() -> None:
    old = CC_LOGP.clone()
    old[0, 0] = CC_LOGP[0, 0] - math.log(1.5)  # ρ = 1.5 with Â = 3 > 0: already clipped
    adv_tok = CC_ADV[:, None].expand(2, 4)
    sel = _detached(CC_LOGP, old, adv_tok, torch.ones(2, 4, dtype=torch.bool), ClipCovConfig(ratio=1.0), GRPOConfig())
    assert _cells(sel) == CC_BAND - {(0, 0)}


def test_clip_cov_objective_generator_state_round_trip() -> None:
    objective = Objective("clip_cov", config=ClipCovConfig(ratio=0.2), seed=3)  # budget ⌊1.6⌋ = 1
    saved = objective.state_dict()

    def detached_cells() -> set[tuple[int, int]]:
        batch = _cc_batch()
        out = objective.loss(batch)
        assert out.terms["clip_cov_detached"] == 1.0
        out.loss.backward()
        return {(b, t) for b in range(2) for t in range(4) if batch.logp.grad[b, t] == 0.0}  # type: ignore[index]

    first = [detached_cells() for _ in range(6)]
    objective.load_state_dict(saved)
    again = [detached_cells() for _ in range(6)]
    assert first == again
    assert len({frozenset(c) for c in first}) > 1  # the generator advances between calls
    with pytest.raises(ValueError, match=r"clip_cov\.cov_high"):
        ClipCovConfig(cov_low=5.0, cov_high=1.0)
    with pytest.raises(ValueError, match=r"clip_cov\.ratio"):
        ClipCovConfig(ratio=1.5)


def test_kl_cov_says_when_it_cannot_act(tmp_path):
    """On-policy KL-Cov is GRPO bit for bit (the study measured identical runs): the run's log says so at
    start, and stops saying so once the run is off-policy."""
    from latentx.config import apply_overrides
    from latentx.objectives.kl_cov import KLCovConfig, kl_cov_inert_reason
    from latentx.trainer import TrainConfig, Trainer, resolve_config

    assert "updates_per_step" in kl_cov_inert_reason(KLCovConfig(), 1)
    assert kl_cov_inert_reason(KLCovConfig(), 2) is None
    assert "no token" in kl_cov_inert_reason(KLCovConfig(k_ratio=0.0), 2)
    for passes, warned in ((1, True), (2, False)):
        lines: list[str] = []
        cfg = apply_overrides(TrainConfig(), [
            "objective=kl_cov", "steps=1", f"out={tmp_path}/run{passes}", "warm_start.enabled=false",
            "eval.enabled=false", "task.train_size=8", f"optim.updates_per_step={passes}"])
        Trainer(resolve_config(cfg), progress=False, log=lines.append)
        assert any("KL-Cov acts only off-policy" in line for line in lines) is warned, lines
