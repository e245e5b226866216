"""relax_terms (one implementation, batch-wide totals), presets paper | authors, xi_mode, dual-clip, dynamic
sampling (issue 17; METHODS.md §3, §3a).  Presets are checked against an independent slow re-implementation
of §3a written from the text: one trajectory at a time, python floats (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from latentx.config import ConfigError, apply_overrides, from_dict, to_dict
from latentx.objectives import GRPOConfig, PolicyBatch, RelaxConfig, relax_loss
from latentx.objectives.grpo import clipped_surrogate
from latentx.objectives.relax import PRESETS, BatchTotals, kl_set_members, relax_batch_plan, relax_terms


# ------------------------------------------------------------------------------------------------------
# the slow reference of METHODS.md §3 / §3a, from the text
# ------------------------------------------------------------------------------------------------------


def slow_latent(adv, dsd, lengths, logp, ref, group, *, alpha, beta, xi, kl_set, kl_reduce, xp_weight, lme_scope,
                l_max, pools=None):
    """α·L_xp + β·KL_I for lists of python floats; ``pools`` = micro-batches (lists of indices) for
    lme_scope="microbatch" (each pool weighted by its share of responses)."""
    n = len(adv)
    in_set = [dsd[i] > xi and (kl_set == "paper" or adv[i] > 0) for i in range(n)]

    def w(i):
        a = adv[i] * lengths[i] / l_max if xp_weight == "padded_mean" else adv[i]
        return max(a, 0.0)

    def lme(idx):
        xs = [-w(i) * dsd[i] for i in idx]
        top = max(xs)
        return top + math.log(sum(math.exp(x - top) for x in xs) / len(xs))

    if lme_scope == "group":
        groups = sorted(set(group))
        xp = sum(lme([i for i in range(n) if group[i] == g]) for g in groups) / len(groups)
    else:
        pools = pools or [list(range(n))]
        xp = sum(lme(p) * len(p) / n for p in pools)

    def k3(i, t):
        d = ref[i][t] - logp[i][t]
        return math.exp(d) - d - 1.0

    members = [i for i in range(n) if in_set[i]]
    if not members:
        kl = 0.0
    elif kl_reduce == "set_mean":
        kl = sum(sum(k3(i, t) for t in range(lengths[i])) / max(lengths[i], 1) for i in members) / len(members)
    else:
        kl = sum(k3(i, t) for i in members for t in range(lengths[i])) / sum(lengths)
    return alpha * xp + beta * kl, xp, kl, in_set


def _random_batch(seed=0, B=8, T=6, R=4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    dsd = torch.rand(B, generator=g, dtype=torch.float64) * 20
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    group = torch.arange(B) // R
    return adv, dsd, lengths, mask, logp, ref, group


@pytest.mark.parametrize("preset", ["paper", "authors"])
@pytest.mark.parametrize("mix", [{}, {"kl_reduce": "set_mean"}, {"xp_weight": "advantage", "lme_scope": "group"}])
def test_relax_loss_matches_the_slow_reference_of_each_preset(preset, mix):
    adv, dsd, lengths, mask, logp, ref, group = _random_batch()
    cfg = RelaxConfig(preset=preset, alpha=0.3, beta=0.5, xi=8.0, **mix)
    for k, v in mix.items():
        assert getattr(cfg, k) == v  # an explicit option wins over the preset
    logp_leaf = logp.clone().requires_grad_(True)
    batch = PolicyBatch(logp=logp_leaf, old_logp=logp, mask=mask, advantages=adv, group=group, ref_logp=ref, dsd=dsd)
    out = relax_loss(batch, cfg, GRPOConfig())
    l_max = cfg.pad_to if cfg.pad_to and cfg.pad_to > 0 else mask.shape[1]
    want, xp, kl, in_set = slow_latent(
        adv.tolist(), dsd.tolist(), lengths.tolist(), logp.tolist(), ref.tolist(), group.tolist(), alpha=0.3, beta=0.5,
        xi=8.0, kl_set=cfg.kl_set, kl_reduce=cfg.kl_reduce, xp_weight=cfg.xp_weight, lme_scope=cfg.lme_scope,
        l_max=l_max,
    )
    assert 0 < sum(in_set) < len(in_set)
    assert out.terms["xp"] == pytest.approx(xp, rel=1e-6)
    assert out.terms["kl_set_kl"] == pytest.approx(kl, rel=1e-6)
    assert out.terms["kl_set_size"] == sum(in_set)
    assert (out.parts["xp"] + out.parts["kl"]).item() == pytest.approx(want, rel=1e-6)


def test_authors_preset_values_and_paper_defaults():
    a, p = RelaxConfig(preset="authors"), RelaxConfig()
    assert (a.xi, a.kl_set, a.kl_reduce, a.xp_weight, a.lme_scope, a.spectrum, a.scaling) == (
        10.0, "code", "token_mean", "padded_mean", "microbatch", "singular", "unscaled")
    assert (a.init, a.fit_loss, a.fit_lr, a.fit_seed, a.refit_every, a.fit_window, a.pad_to) == (
        "kaiming_uniform", "svd", 1e-3, 42, 50, 512, -1)
    assert (p.xi, p.kl_set, p.lme_scope, p.spectrum, p.fit_lr, p.refit_every, p.pad_to) == (
        25.0, "paper", "group", "eig", 1e-4, 0, 0)


def test_train_config_preset_sets_the_grpo_part_and_round_trips():
    from latentx.trainer import TrainConfig

    cfg = from_dict(TrainConfig, {"objective": "relax", "relax": {"preset": "authors"}, "rollout": {"max_new_tokens": 24}})
    assert (cfg.grpo.clip_low, cfg.grpo.clip_high, cfg.grpo.dual_clip) == (1.0, 1.0, 10.0)
    assert cfg.rollout.dynamic_sampling is True and cfg.relax.pad_to == 24
    # resolved values are what config.yaml records
    d = to_dict(cfg)
    assert d["relax"]["xi"] == 10.0 and d["grpo"]["dual_clip"] == 10.0 and d["relax"]["pad_to"] == 24
    # explicit options win over the preset
    mixed = from_dict(TrainConfig, {"relax": {"preset": "authors", "xi": 3.0}, "grpo": {"clip_high": 0.28}})
    assert mixed.relax.xi == 3.0 and mixed.grpo.clip_high == 0.28 and mixed.grpo.clip_low == 1.0
    # an override round trip re-resolves what the preset filled (the study / bench path)
    switched = apply_overrides(TrainConfig(), ["relax.preset=authors"])
    assert switched.relax.xi == 10.0 and switched.grpo.dual_clip == 10.0
    back = apply_overrides(switched, ["relax.preset=paper"])
    assert back.relax.xi == 25.0 and back.grpo.clip_low == 0.2 and back.rollout.dynamic_sampling is False
    # other objectives keep their own GRPO defaults
    assert from_dict(TrainConfig, {"objective": "grpo", "relax": {"preset": "authors"}}).grpo.clip_low == 0.2


def test_bad_input_names_the_field():
    from latentx.trainer import TrainConfig

    with pytest.raises(ValueError, match=r"relax\.preset"):
        RelaxConfig(preset="code")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"relax\.preset"):
        from_dict(TrainConfig, {"relax": {"preset": "nope"}})
    for q in (0.0, 1.0, 25.0):
        with pytest.raises(ValueError, match=r"relax\.xi .*\(0, 1\)"):
            RelaxConfig(xi_mode="quantile", xi=q)
    with pytest.raises(ConfigError, match=r"relax\.pad_to"):
        from_dict(TrainConfig, {"relax": {"pad_to": 8}, "rollout": {"max_new_tokens": 16}})
    with pytest.raises(ConfigError, match=r"grpo\.dual_clip"):
        from_dict(TrainConfig, {"grpo": {"dual_clip": 0.5}})
    for ridge in (0.0, 1e-13):  # below the Koopman ridge floor: refused at config time, naming the field
        with pytest.raises(ConfigError, match=r"relax\.ridge .*floor"):
            from_dict(TrainConfig, {"relax": {"ridge": ridge}})


def test_quantile_kl_set_is_the_top_fraction():
    dsd = torch.tensor([0.01, 0.05, 0.03, 0.02, 0.04, 0.00])
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    members, xi = kl_set_members(adv, dsd, RelaxConfig(xi_mode="quantile", xi=0.34))  # ⌈0.34·6⌉ = 3
    assert members.tolist() == [False, True, True, False, True, False] and xi == pytest.approx(0.03)
    members, _ = kl_set_members(adv, dsd, RelaxConfig(xi_mode="quantile", xi=0.34, kl_set="code"))
    assert members.tolist() == [False, False, True, False, True, False]
    assert kl_set_members(adv, dsd, RelaxConfig())[0].sum() == 0  # ξ = 25: empty at this scale


# ------------------------------------------------------------------------------------------------------
# any split of the batch gives the unsplit value and gradient
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["paper", "authors"])
def test_relax_terms_shares_add_up_over_any_split_with_split_groups(preset):
    adv, dsd, lengths, mask, logp, ref, group = _random_batch(seed=3, B=12, R=3)
    cfg = RelaxConfig(preset=preset, alpha=0.4, beta=0.7, xi_mode="quantile", xi=0.3,
                      **({"lme_scope": "group"} if preset == "authors" else {}))
    plan = relax_batch_plan(adv, dsd, group, lengths, cfg, length_norm=6)
    assert plan.totals.in_set > 0

    def run(splits):
        d, lp = dsd.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        total = 0.0
        for rows in splits:
            total = total + relax_terms(adv[rows], d[rows], group[rows], mask[rows], plan.in_set[rows], cfg, plan.totals,
                                        logp=lp[rows], ref_logp=ref[rows], group_lse=plan.group_lse[rows],
                                        group_count=plan.group_count[rows]).loss
        total.backward()
        return total.item(), torch.cat([d.grad, lp.grad.flatten()])

    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))  # groups end up split
    value, grad = run([torch.arange(12)])
    for k in (2, 4):
        v, g = run(list(perm.chunk(k)))
        assert v == pytest.approx(value, rel=1e-6)  # the loss arithmetic is float32 (objectives/base.py)
        assert (g - grad).norm() <= 1e-6 * grad.norm()


def test_split_group_without_group_lse_is_refused():
    adv, dsd, lengths, mask, logp, ref, group = _random_batch(B=8, R=4)
    cfg = RelaxConfig()
    totals = BatchTotals(2, 8, int(mask.sum()), 0)
    with pytest.raises(ValueError, match="group_lse"):
        relax_terms(adv[:2], dsd[:2], group[:2], mask[:2], torch.zeros(2, dtype=torch.bool), cfg, totals,
                    group_count=torch.full((2,), 4.0))


def _trainer(tmp_path, **extra):
    from latentx.trainer import Trainer, TrainConfig, resolve_config

    overrides = {
        "objective": "relax", "steps": 1, "out": str(tmp_path / "run"), "eval": {"enabled": False},
        "warm_start": {"enabled": False}, "task": {"train_size": 32},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 12, "micro_batch_size": 16},
        "relax": {"xi_mode": "quantile", "xi": 0.25, "beta": 0.5, "alpha": 1.0, "m": 4},
    }
    for k, v in extra.items():
        overrides.setdefault(k, {}).update(v) if isinstance(v, dict) else overrides.__setitem__(k, v)
    return Trainer(resolve_config(from_dict(TrainConfig, overrides)), progress=False, log=lambda *a: None)


def test_core_trainer_gradient_is_the_same_for_1_2_4_micro_batches(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.model.double()
    ro = trainer.rollout()
    # the untrained tiny model scores 0 everywhere: give the groups distinct rewards so that L_xp acts
    ro.rewards = torch.rand(len(ro.rewards), generator=torch.Generator().manual_seed(0))
    adv, _ = trainer.advantages(ro)
    info = trainer.kl_set(ro, adv)
    assert info["kl_set_size"] > 0 and info["reference_rows"] == info["kl_set_size"]  # reference only for I
    assert ro.ref_logp[~ro.in_set].abs().sum() == 0
    trainer.update(ro, adv)  # one step away from the reference, so that KL_I > 0
    results = []
    for size in (16, 8, 4):  # 1, 2 and 4 micro-batches (groups of 4 stay whole: the trainer aligns them)
        trainer.cfg.rollout.micro_batch_size = size
        trainer.optimizer.zero_grad(set_to_none=True)
        terms = trainer.accumulate(ro, adv)
        grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        results.append((terms["loss"], terms["xp"], terms["kl_set_kl"], grad))
    loss, xp, kl, grad = results[0]
    assert xp != 0.0 and kl > 0.0
    for other in results[1:]:
        assert other[0] == pytest.approx(loss, rel=1e-6) and other[1] == pytest.approx(xp, rel=1e-6)
        assert other[2] == pytest.approx(kl, rel=1e-6)
        assert float((other[3] - grad).norm()) <= 1e-6 * float(grad.norm())
    # per-term gradients (diagnostics.term_grads_every): the terms' gradients add up to the total
    trainer.optimizer.zero_grad(set_to_none=True)
    terms = trainer.accumulate(ro, adv, term_grads=True)
    assert {"grad_norm/pg", "grad_norm/xp", "grad_norm/kl", "grad_cos_pg/xp"} <= set(terms)
    assert terms["grad_cos_pg/pg"] == pytest.approx(1.0)
    assert terms["grad_norm/xp"] > 0 and terms["grad_norm/kl"] > 0


@pytest.mark.parametrize("xp_weight", ["advantage", "padded_mean"])
def test_update_differentiates_dsd_only_where_lxp_has_weight(tmp_path, xp_weight):
    """DSD with gradient on the Â > 0 rows only gives the loss, terms and gradient of DSD on every row."""
    trainer = _trainer(tmp_path, relax={"xp_weight": xp_weight})
    trainer.model.double()
    ro = trainer.rollout()
    ro.rewards = torch.rand(len(ro.rewards), generator=torch.Generator().manual_seed(1))
    adv, _ = trainer.advantages(ro)
    trainer.kl_set(ro, adv)
    rows_seen = []
    full_dsd = trainer._dsd
    trainer._dsd = lambda hidden, mask: rows_seen.append(hidden.shape[0]) or full_dsd(hidden, mask)
    results = []
    for hook in (None, lambda *args: None):  # the objective's rows, then every row (the plain computation)
        if hook is not None:
            trainer.objective.dsd_grad_rows = hook
        trainer.optimizer.zero_grad(set_to_none=True)
        terms = trainer.accumulate(ro, adv)
        grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        results.append((terms, grad))
    (fast, g_fast), (plain, g_plain) = results
    positive = int((adv > 0).sum())
    assert 0 < positive < len(adv) and rows_seen[0] == positive and rows_seen[-1] == len(adv)
    assert fast["xp"] != 0.0
    assert set(fast) == set(plain) and {"loss", "xp"} <= set(fast)
    for key in fast:
        assert fast[key] == pytest.approx(plain[key], rel=1e-9, abs=1e-12), key
    assert float((g_fast - g_plain).norm()) <= 1e-9 * float(g_plain.norm())


def test_empty_kl_set_runs_no_reference_and_warns_once(tmp_path):
    messages = []
    trainer = _trainer(tmp_path, relax={"xi_mode": "absolute", "xi": 25.0})
    trainer.log = messages.append
    assert trainer.reference is None  # saved, not loaded
    for _ in range(10):
        ro = trainer.rollout()
        adv, _ = trainer.advantages(ro)
        info = trainer.kl_set(ro, adv)
        assert info["kl_set_size"] == 0 and info["reference_rows"] == 0 and ro.ref_logp is None
    assert trainer.reference is None
    assert len(messages) == 1 and "relax.xi_mode=quantile" in messages[0] and "DSD range" in messages[0]


# ------------------------------------------------------------------------------------------------------
# GRPO part of the authors' code: dual-clip; dynamic sampling
# ------------------------------------------------------------------------------------------------------


def test_dual_clip_matches_the_per_token_formula():
    ratio = torch.tensor([[0.1, 0.5, 1.0, 3.0, 20.0, 30.0]], dtype=torch.float64)
    for a in (1.0, -1.0):
        adv = torch.full_like(ratio, a)
        mask = torch.ones_like(ratio, dtype=torch.bool)
        per_token, _ = clipped_surrogate(ratio.log(), torch.zeros_like(ratio), adv, mask, 1.0, 1.0, dual_clip=10.0)
        for r, got in zip(ratio[0].tolist(), per_token[0].tolist()):
            want = max(-a * r, -a * min(max(r, 0.0), 2.0))
            if a < 0:
                want = min(want, -a * 10.0)
            assert got == pytest.approx(want, rel=1e-6)


def test_dynamic_sampling_keeps_only_informative_groups():
    from latentx.dynamic_sampling import fill_informative
    from latentx.rollout import Sequences

    calls = []
    rewards_by_prompt = {0: [1, 1], 1: [0, 1], 2: [0, 0], 3: [1, 0], 4: [1, 1], 5: [0, 1]}

    def draw(n):
        start = sum(calls)
        calls.append(n)
        ids = list(range(start, start + n))
        P, T = 2 + len(calls) % 2, 3 + len(calls)  # batches of different shapes are stacked
        seqs = Sequences(torch.ones(2 * n, P + T, dtype=torch.long), torch.ones(2 * n, P + T, dtype=torch.long), P,
                         torch.ones(2 * n, T, dtype=torch.bool), [f"p{i}" for i in ids for _ in range(2)])
        rewards = torch.tensor([float(r) for i in ids for r in rewards_by_prompt[i]])
        return ids, seqs, rewards, rewards > 0

    inst, seqs, rewards, correct, info = fill_informative(draw, 3, 2, retries=3, pad_id=0)
    assert inst == [1, 3, 5] and calls == [3, 2, 1]
    assert info == {"dynamic_sampling_rounds": 2.0, "dynamic_sampling_dropped": 3.0, "dynamic_sampling_short": 0.0}
    assert seqs.input_ids.shape[0] == 6 and rewards.view(3, 2).std(1).min() > 0
    calls.clear()
    inst, _, _, _, info = fill_informative(draw, 3, 2, retries=0, pad_id=0)
    assert inst == [1, 0, 2] and info["dynamic_sampling_short"] == 2.0  # limit reached: refill with dropped groups


def test_presets_table_is_complete():
    assert set(PRESETS["paper"]) == set(PRESETS["authors"])
