"""VERL presets and the §3b options against an independent, slow re-implementation of METHODS.md §3/§3b.

The reference below is written from the text of METHODS.md (sections 0, 3 "verl" and 3b), one response
at a time, in python floats (the float32 paths) or -- for ``dtype="bfloat16"`` -- with the released
code's order of operations on 0-dim bfloat16 tensors, including its bfloat16 GRPO.  It shares no code with
``latentx.objectives.verl``.  Every scenario runs several steps in sequence (so the EMA state matters)
on groups of 8 responses with rewards in {0, 1}.

Tolerances: float32 paths 1e-6 (absolute, on advantages up to ~2.7).  bfloat16 paths 2**-6 = 0.0156:
one bfloat16 rounding step at |Â| in [2, 4) (where a bfloat16 ulp is 2**-6); the release runs GRPO itself
in bfloat16, latentx runs the adapter's float32 GRPO on the bfloat16 rewards and rounds the result, and
vectorised vs scalar tanh / sigmoid may land on different sides of a bfloat16 rounding boundary.
"""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch

from latentx.config import ConfigError, apply_overrides, from_dict, to_dict
from latentx.objectives import Objective, VerlConfig, VerlInputs, VerlShaper, group_advantages
from latentx.objectives.verl import VERL_PRESETS, verl_step

R = 8  # responses per prompt
G = 4  # prompts per step
STEPS = 6
T = 12  # padded response length
F32_TOL = 1e-6
BF16_TOL = 2.0**-6


# ----------------------------------------------------------------------------------------------------
# The independent reference (METHODS.md §3 and §3b, written from the text)
# ----------------------------------------------------------------------------------------------------


def _ref_grpo(rewards: list[float], groups: list[int]) -> list[float]:
    """§0: Â_i = (r_i − mean_g) / (std_g + 1e-6), unbiased std; 0 for a single-member group."""
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        if len(members) < 2:
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        out.append((r - mean) / (std + 1e-6))
    return out


def _ref_grpo_bf16(rewards: list[torch.Tensor], groups: list[int]) -> list[torch.Tensor]:
    """GRPO the way the release ran it: bfloat16 scores, per-group mean / std of a bfloat16 tensor built
    from them, and the result written back into the bfloat16 score tensor."""
    scores = torch.stack(rewards).to(torch.bfloat16)
    ids = sorted(set(groups))
    mean = {g: torch.mean(torch.tensor([scores[i] for i in range(len(groups)) if groups[i] == g])) for g in ids}
    std = {g: torch.std(torch.tensor([[scores[i] for i in range(len(groups)) if groups[i] == g]])) for g in ids}
    for i, g in enumerate(groups):
        scores[i] = (scores[i] - mean[g]) / (std[g] + 1e-6)
    return [scores[i] for i in range(len(groups))]


class Reference:
    """VERL shaping step by step (METHODS.md §3, §3b); options as plain keyword arguments."""

    def __init__(self, *, aux_in_reward=False, advantage_bonus=True, apply_to="all_tokens", ema_lag=False,
                 performance_ema="mapped", dtype="float32", ema_rate=0.3, gain=2.0, kappa=2.0, coef=1.0,
                 gating="era", performance_scaling=False):
        self.o = dict(aux_in_reward=aux_in_reward, advantage_bonus=advantage_bonus, apply_to=apply_to,
                      ema_lag=ema_lag, performance_ema=performance_ema, dtype=dtype, a=ema_rate, g=gain,
                      kappa=kappa, c0=coef, gating=gating, perf=performance_scaling)
        self.m = {"er": 0.0, "erv": 0.0, "era": 0.0}  # baselines, start at 0
        self.previous_means = None  # ema_lag: the previous step's batch means, folded in after shaping
        self.e = 0.0  # performance EMA
        self.step_no = 0

    # -- one step ------------------------------------------------------------------------------------
    def step(self, rewards, groups, x, lengths):
        """rewards, groups: lists; x: {"er"/"erv"/"era": list}; lengths: valid tokens per response.
        Returns the token advantages as a list of per-response lists (length T, 0 at padding)."""
        o = self.o
        self.step_no += 1
        bf16 = o["dtype"] == "bfloat16"
        n = len(rewards)
        shaping_on = o["aux_in_reward"] or o["advantage_bonus"]
        signal = shaping_on and self.step_no >= 2
        c = o["c0"] * (1.0 - (self.e + 1.0) / 2.0) if o["perf"] else o["c0"]
        if not bf16:
            adv = _ref_grpo(rewards, groups)
            aux = [self._aux(x["er"][i], x["erv"][i], x["era"][i], c) if signal else 0.0 for i in range(n)]
            if signal and o["aux_in_reward"]:
                adv = _ref_grpo([rewards[i] + aux[i] for i in range(n)], groups)
            bonus = [min(max(aux[i], 0.0), abs(adv[i]) / o["kappa"]) if signal and o["advantage_bonus"] else 0.0
                     for i in range(n)]
            final = [adv[i] + bonus[i] for i in range(n)]
        else:
            adv, final = self._step_bf16(rewards, groups, x, c, signal)
        tokens = []
        for i in range(n):
            row = [0.0] * T
            for t in range(lengths[i]):
                last = t == lengths[i] - 1
                row[t] = final[i] if (o["apply_to"] == "all_tokens" or last) else adv[i]
            tokens.append(row)
        if shaping_on or True:  # the EMA runs whatever the shaping does (it is logged)
            self._update(rewards, x)
        return tokens

    def _aux(self, er, erv, era, c):
        o = self.o
        rel = {k: max(-5.0, min(5.0, (v - self.m[k]) / (abs(self.m[k]) + 1e-8))) for k, v in
               (("er", er), ("erv", erv), ("era", era))}
        if o["gating"] == "era":
            tau = 1.0 / (1.0 + math.exp(-o["g"] * rel["era"]))
            return c * (tau * math.tanh(rel["er"]) + (1.0 - tau) * math.tanh(rel["erv"]))
        if o["gating"] == "fixed_half":
            return c * (0.5 * math.tanh(rel["er"]) + 0.5 * math.tanh(rel["erv"]))
        return c * (math.tanh(rel["er"]) + math.tanh(rel["erv"]))

    def _step_bf16(self, rewards, groups, x, c, signal):
        """The release's arithmetic, response by response, on 0-dim bfloat16 tensors."""
        o = self.o
        n = len(rewards)
        score = [torch.tensor(r, dtype=torch.bfloat16) for r in rewards]
        shaped_score = [s.clone() for s in score]
        if signal:
            w_explore = torch.tensor([0.0, 0.0, 1.0])
            w_exploit = torch.tensor([0.0, 1.0, 0.0])
            for i in range(n):
                vals = {k: torch.tensor(x[k][i], dtype=torch.bfloat16) for k in ("era", "erv", "er")}
                rel = {k: torch.clamp((v - self.m[k]) / (abs(self.m[k]) + 1e-8), -5.0, 5.0) for k, v in vals.items()}
                if o["gating"] == "era":
                    tau = torch.sigmoid(o["g"] * rel["era"])
                    weights = tau * w_explore + (1.0 - tau) * w_exploit
                elif o["gating"] == "fixed_half":
                    tau = torch.tensor(0.5)
                    weights = tau * w_explore + (1.0 - tau) * w_exploit
                else:
                    weights = w_explore + w_exploit
                total = 0.0
                for k, w in zip(("era", "erv", "er"), weights):
                    total = total + torch.tanh(rel[k]) * w
                cell = shaped_score[i].clone()  # 0-dim bfloat16: += a 0-dim float32 adds in float32, then rounds
                cell += total * c
                shaped_score[i] = cell
        adv = _ref_grpo_bf16(shaped_score if (signal and o["aux_in_reward"]) else score, groups)
        final = []
        for i in range(n):
            if signal and o["advantage_bonus"]:
                aux = shaped_score[i] - score[i]
                bonus = torch.minimum(torch.relu(aux), adv[i].abs() / o["kappa"])
                final.append(float(adv[i] + bonus))
            else:
                final.append(float(adv[i]))
        return [float(a) for a in adv], final

    def _update(self, rewards, x):
        o = self.o
        bf16 = o["dtype"] == "bfloat16"
        if bf16:
            means = {k: torch.mean(torch.tensor(v, dtype=torch.bfloat16)).item() for k, v in x.items()}
        else:
            means = {k: sum(v) / len(v) for k, v in x.items()}
        if o["ema_lag"]:
            if self.previous_means is not None:
                for k in self.m:
                    self.m[k] = (1 - o["a"]) * self.m[k] + o["a"] * self.previous_means[k]
            self.previous_means = means
        else:
            for k in self.m:
                self.m[k] = (1 - o["a"]) * self.m[k] + o["a"] * means[k]
        mean_r = sum(rewards) / len(rewards)
        if o["performance_ema"] == "mapped":
            self.e = (1 - o["a"]) * self.e + o["a"] * max(-1.0, min(1.0, 2.0 * mean_r - 1.0))
        elif self.step_no >= 2:
            self.e = (1 - o["a"]) * self.e + o["a"] * mean_r


# ----------------------------------------------------------------------------------------------------
# Synthetic multi-step batches
# ----------------------------------------------------------------------------------------------------


def _batches(seed: int, steps: int = STEPS):
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        rewards = [float(rng.random() < 0.45) for _ in range(G * R)]
        if rng.random() < 0.5:  # one group with all rewards equal (GRPO gives it 0 unless aux enters)
            rewards[:R] = [1.0] * R
        er = [rng.uniform(4.0, 40.0) for _ in range(G * R)]
        erv = [rng.gauss(0.3, 2.0) for _ in range(G * R)]
        era = [rng.gauss(0.0, 1.0) for _ in range(G * R)]
        lengths = [rng.randint(1, T) for _ in range(G * R)]
        # float32 values, as the adapters hold them (both sides then start from the same numbers)
        er, erv, era = (torch.tensor(v, dtype=torch.float32).tolist() for v in (er, erv, era))
        out.append((rewards, {"er": er, "erv": erv, "era": era}, lengths))
    return out


def _run_ours(cfg: VerlConfig, batches):
    shaper = VerlShaper(cfg)
    group = torch.arange(G * R) // R
    rows = []
    for rewards, x, lengths in batches:
        r = torch.tensor(rewards)
        adv = group_advantages(r, group)
        mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        inputs = VerlInputs(adv, torch.tensor(x["er"]), torch.tensor(x["erv"]), torch.tensor(x["era"]), r, group)
        tok, _ = shaper.shape(inputs, mask)
        rows.append(tok)
    return rows


def _run_reference(options: dict, batches):
    ref = Reference(**options)
    groups = [i // R for i in range(G * R)]
    return [torch.tensor(ref.step(rewards, groups, x, lengths)) for rewards, x, lengths in batches]


def _resolved(cfg: VerlConfig) -> dict:
    b = cfg.behaviour
    opts = {k: getattr(b, k) for k in ("aux_in_reward", "advantage_bonus", "apply_to", "ema_lag", "performance_ema", "dtype")}
    opts.update(ema_rate=cfg.ema_rate, gain=cfg.gain, kappa=cfg.kappa, coef=cfg.coef, gating=cfg.gating,
                performance_scaling=cfg.performance_scaling)
    return opts


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


SINGLE_OPTIONS = [
    dict(),
    dict(aux_in_reward=True),
    dict(advantage_bonus=False),
    dict(apply_to="last_token"),
    dict(ema_lag=True),
    dict(performance_scaling=True),
    dict(performance_scaling=True, performance_ema="raw"),
    dict(dtype="bfloat16"),
    dict(gating="fixed_half", aux_in_reward=True),
    dict(gating="sum", ema_lag=True, apply_to="last_token"),
]
PRESET_CASES = [
    dict(preset="paper"),
    dict(preset="release"),
    dict(preset="enabled"),
    dict(preset="enabled", performance_scaling=True, gating="fixed_half"),
    dict(preset="enabled", gain=1.5, ema_rate=0.7),  # the release's YAML defaults
]


@pytest.mark.parametrize("options", SINGLE_OPTIONS + PRESET_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("seed", [0, 1])
def test_against_reference(options: dict, seed: int) -> None:
    cfg = VerlConfig(**options)
    batches = _batches(seed)
    ours = _run_ours(cfg, batches)
    ref = _run_reference(_resolved(cfg), batches)
    tol = BF16_TOL if cfg.behaviour.bf16 else F32_TOL
    for step, (a, b) in enumerate(zip(ours, ref), start=1):
        diff = float((a - b).abs().max())
        assert diff <= tol, f"step {step}: max |ours - reference| = {diff:.3g} > {tol:.3g}"
    if not cfg.behaviour.inert:  # the scenario really shapes: later steps differ from plain GRPO
        grpo = _run_reference(dict(advantage_bonus=False), batches)
        assert _max_diff(ours[1:], grpo[1:]) > 1e-3


def test_bf16_paths_agree_closely_and_round() -> None:
    """The bfloat16 path: within the stated tolerance of the release's arithmetic, and really bfloat16."""
    cfg = VerlConfig(preset="enabled")
    batches = _batches(3)
    ours = _run_ours(cfg, batches)
    ref = _run_reference(_resolved(cfg), batches)
    worst = _max_diff(ours, ref)
    assert worst <= BF16_TOL
    for tok in ours:
        assert torch.equal(tok, tok.to(torch.bfloat16).float())  # every value is bfloat16-representable
    f32 = _run_ours(VerlConfig(aux_in_reward=True, apply_to="last_token", ema_lag=True, performance_ema="raw"), batches)
    assert _max_diff(ours, f32) > 1e-3  # the rounding is visible against the float32 path


def test_release_is_grpo_bit_for_bit(caplog) -> None:
    cfg = VerlConfig(preset="release")
    assert cfg.behaviour.inert
    shaper = VerlShaper(cfg)
    group = torch.arange(G * R) // R
    with caplog.at_level(logging.INFO, logger="latentx.verl"):
        for rewards, x, lengths in _batches(5):
            r = torch.tensor(rewards)
            adv = group_advantages(r, group)
            mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
            tok, info = shaper.shape(
                VerlInputs(adv, torch.tensor(x["er"]), torch.tensor(x["erv"]), torch.tensor(x["era"]), r), mask
            )
            expected = torch.where(mask, adv[:, None].expand_as(mask), torch.zeros(()))
            assert torch.equal(tok, expected)
            assert info["verl_bonus_mean"] == 0.0 and info["verl_active"] == 0.0
    notices = [rec for rec in caplog.records if rec.name == "latentx.verl"]
    assert len(notices) == 1 and "plain GRPO" in notices[0].getMessage()
    assert notices[0].levelno == logging.WARNING
    assert shaper.baselines.steps == STEPS  # ER is still tracked (and logged)


def test_objective_release_equals_grpo_objective() -> None:
    """Through the Objective dispatch the trainer uses: the same advantages as plain GRPO's, bit for bit."""
    verl = Objective("verl", config=VerlConfig(preset="release"))
    grpo = Objective("grpo")
    group = torch.arange(G * R) // R
    for rewards, x, lengths in _batches(6, steps=3):
        r = torch.tensor(rewards)
        mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        adv_v, _ = verl.shape_advantages(verl.advantages(r, group), torch.tensor(x["er"]), torch.tensor(x["erv"]),
                                         torch.tensor(x["era"]), mask, r)
        adv_g = grpo.advantages(r, group)
        assert torch.equal(adv_v, torch.where(mask, adv_g[:, None].expand_as(mask), torch.zeros(())))


def test_lag_step_two_shapes_against_zero() -> None:
    """§3b: with the lag, step 1 is unshaped and step 2 shapes against a baseline of 0 (rel = ±5)."""
    cfg = VerlConfig(ema_lag=True)
    shaper = VerlShaper(cfg)
    group = torch.arange(G * R) // R
    (r1, x1, _), (r2, x2, _) = _batches(7, steps=2)
    for rewards, x in ((r1, x1), (r2, x2)):
        r = torch.tensor(rewards)
        out, info = shaper.step(
            VerlInputs(group_advantages(r, group), *(torch.tensor(x[k]) for k in ("er", "erv", "era")), r)
        )
        used_first = info["verl_first_step"]
    assert used_first == 0.0 and info["verl_m_er"] == 0.0
    rel = out.parts["rel_er"]
    assert torch.equal(rel.abs(), torch.full_like(rel, 5.0))
    assert shaper.baselines.er == pytest.approx(0.3 * sum(x1["er"]) / len(x1["er"]), rel=1e-6)


def test_state_round_trip_continues_exactly() -> None:
    cfg = VerlConfig(preset="enabled")
    batches = _batches(8)
    whole = _run_ours(cfg, batches)
    group = torch.arange(G * R) // R
    first = VerlShaper(cfg)
    rows = []
    for i, (rewards, x, lengths) in enumerate(batches):
        if i == 3:  # "resume": a fresh shaper from the saved state
            state = first.state_dict()
            first = VerlShaper(cfg)
            first.load_state_dict(state)
        r = torch.tensor(rewards)
        mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        signals = (torch.tensor(x[k]) for k in ("er", "erv", "era"))
        tok, _ = first.shape(VerlInputs(group_advantages(r, group), *signals, rewards=r, group=group), mask)
        rows.append(tok)
    assert all(torch.equal(a, b) for a, b in zip(whole, rows))


def test_old_state_without_pending_loads() -> None:
    shaper = VerlShaper(VerlConfig())
    shaper.load_state_dict({"er": 1.0, "erv": 2.0, "era": 3.0, "reward_ema": 0.5, "steps": 4})
    assert shaper.baselines.er == 1.0 and shaper.baselines.pending_er == 0.0


# ----------------------------------------------------------------------------------------------------
# Config: presets, the mixing rule, bad input
# ----------------------------------------------------------------------------------------------------


def test_presets_resolve() -> None:
    assert VerlConfig().behaviour == VerlConfig(preset="paper").behaviour
    for name, values in VERL_PRESETS.items():
        b = VerlConfig(preset=name).behaviour
        assert {k: getattr(b, k) for k in values} == values
    assert VerlConfig(preset="release").behaviour.inert
    assert not VerlConfig(preset="enabled").behaviour.inert
    # an explicit option that agrees with the preset is fine; hyperparameters are free under a preset
    VerlConfig(preset="release", dtype="bfloat16", apply_to="last_token", gain=1.5)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(preset="authors"), r"^verl\.preset must be one of 'paper', 'release', 'enabled'"),
        (dict(preset="release", dtype="float32"), r"^verl\.dtype='float32' contradicts verl\.preset='release'"),
        (dict(preset="enabled", aux_in_reward=False), r"^verl\.aux_in_reward=False contradicts verl\.preset='enabled'"),
        (dict(preset="paper", ema_lag=True), r"^verl\.ema_lag=True contradicts verl\.preset='paper'"),
        (dict(ema_lag=True, ema_rate=0.0), r"^verl\.ema_lag needs verl\.ema_rate > 0"),
        (dict(preset="release", ema_rate=0.0), r"^verl\.ema_lag needs verl\.ema_rate > 0"),
        (dict(dtype="float16"), r"^verl\.dtype must be one of 'float32', 'bfloat16'"),
        (dict(performance_ema="mapped_raw"), r"^verl\.performance_ema must be one of"),
        (dict(aux_in_reward="yes"), r"^verl\.aux_in_reward must be one of False, True"),
    ],
)
def test_bad_input_one_line_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as err:
        VerlConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_through_the_config_loader() -> None:
    """YAML / CLI path: errors name the field; a saved config reloads; a preset can be set afterwards."""
    with pytest.raises(ConfigError, match=r"verl\.preset"):
        from_dict(VerlConfig, {"preset": "bogus"}, prefix="verl")
    with pytest.raises(ConfigError, match=r"^verl\.dtype='float32' contradicts verl\.preset='enabled'"):
        from_dict(VerlConfig, {"preset": "enabled", "dtype": "float32"}, prefix="verl")
    cfg = from_dict(VerlConfig, {"preset": "enabled", "gain": 1.5}, prefix="verl")
    again = from_dict(VerlConfig, to_dict(cfg), prefix="verl")
    assert again == cfg and again.behaviour == cfg.behaviour
    later = apply_overrides(VerlConfig(), ["preset=release"])  # the study's `verl@release`
    assert later.behaviour.inert


def test_aux_in_reward_needs_rewards_and_groups() -> None:
    cfg = VerlConfig(aux_in_reward=True)
    x = torch.ones(8)
    shaper = VerlShaper(cfg)
    shaper.shape(VerlInputs(torch.zeros(8), x, x, x), torch.ones(8, 2, dtype=torch.bool))  # first step: no signal yet
    with pytest.raises(ValueError, match=r"verl\.aux_in_reward needs the step's rewards"):
        verl_step(VerlInputs(torch.zeros(8), x, x, x), shaper.baselines, cfg)
    with pytest.raises(ValueError, match=r"verl\.aux_in_reward needs the prompt group"):
        verl_step(VerlInputs(torch.zeros(8), x, x, x, rewards=x), shaper.baselines, cfg)


# ----------------------------------------------------------------------------------------------------
# The trainer: verl.preset=release trains exactly like grpo, and says so once
# ----------------------------------------------------------------------------------------------------


def test_trainer_release_run_equals_grpo_run(tmp_path) -> None:
    from latentx.trainer import Trainer, read_metrics, resolve_config
    from test_trainer import small_config

    lines: list[str] = []
    rows = {}
    for name, extra in (("grpo", []), ("verl", ["verl.preset=release"])):
        cfg = resolve_config(apply_overrides(small_config(tmp_path, name, *extra), ["steps=2"]))
        Trainer(cfg, progress=False, log=lines.append if name == "verl" else (lambda _: None)).run()
        rows[name] = read_metrics(cfg.run_dir)
    for g, v in zip(rows["grpo"], rows["verl"]):
        for key in ("loss", "pg", "reward_mean", "grad_norm"):
            assert g[key] == v[key], key  # bit for bit: the same advantages, hence the same updates
        # (a [B, T] advantage tensor averages over tokens in another order: round-off only)
        assert g["adv_abs_mean"] == pytest.approx(v["adv_abs_mean"], rel=1e-6)
        assert v["verl_active"] == 0.0
    assert sum("verl.preset=release" in line for line in lines) == 1


def test_objective_enabled_reruns_grpo_with_its_settings() -> None:
    """The registry hook passes the objective's grpo settings (Dr. GRPO here) to the aux-in-reward GRPO."""
    from latentx.objectives import GRPOConfig

    grpo = GRPOConfig(advantage_std=False)
    objective = Objective("verl", grpo=grpo, config=VerlConfig(preset="enabled"))
    shaper = VerlShaper(VerlConfig(preset="enabled"))
    group = torch.arange(G * R) // R
    for rewards, x, lengths in _batches(9, steps=3):
        r = torch.tensor(rewards)
        mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        sig = [torch.tensor(x[k]) for k in ("er", "erv", "era")]
        got, _ = objective.shape_advantages(objective.advantages(r, group), *sig, mask, r, group)
        want, _ = shaper.shape(
            VerlInputs(group_advantages(r, group, std_normalize=False), *sig, r, group, advantage_std=False), mask
        )
        assert torch.equal(got, want)
