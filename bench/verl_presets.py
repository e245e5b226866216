"""How far apart the VERL variants' advantages are: the paper, the released script, its shaping switched on.

    .venv/bin/python bench/verl_presets.py [--seeds 20] [--steps 8] [--groups 16]

Synthetic multi-step batches (groups of 8 responses, rewards in {0, 1} with about 45 % correct and one group
in two with all rewards equal, ER ~ U(4, 40), ERV ~ N(0.3, 2), ERA ~ N(0, 1), response lengths 1..64), run
through :class:`latentx.objectives.VerlShaper` step after step, so the EMA state evolves as in training.
For each comparison it prints the largest and the mean absolute difference of the token advantages
(valid tokens, every step after the first, every seed), as a markdown table.  One §3b option is changed at a
time against the paper's shaping, then the presets are compared with the paper and with plain GRPO.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from latentx.objectives import VerlConfig, VerlInputs, VerlShaper, group_advantages  # noqa: E402

R, T = 8, 64


def batches(seed: int, steps: int, groups: int):
    g = torch.Generator().manual_seed(seed)
    n = groups * R
    for _ in range(steps):
        rewards = (torch.rand(n, generator=g) < 0.45).float()
        if float(torch.rand((), generator=g)) < 0.5:
            rewards[:R] = 1.0
        er = 4.0 + 36.0 * torch.rand(n, generator=g)
        erv = 0.3 + 2.0 * torch.randn(n, generator=g)
        era = torch.randn(n, generator=g)
        lengths = torch.randint(1, T + 1, (n,), generator=g)
        yield rewards, er, erv, era, torch.arange(T)[None, :] < lengths[:, None]


def run(cfg: VerlConfig | None, seed: int, steps: int, groups: int) -> list[torch.Tensor]:
    """Token advantages per step; ``cfg=None`` is plain GRPO."""
    shaper = VerlShaper(cfg) if cfg is not None else None
    group = torch.arange(groups * R) // R
    out = []
    for rewards, er, erv, era, mask in batches(seed, steps, groups):
        adv = group_advantages(rewards, group)
        if shaper is None:
            out.append(torch.where(mask, adv[:, None].expand_as(mask), torch.zeros(())))
        else:
            out.append(shaper.shape(VerlInputs(adv, er, erv, era, rewards=rewards, group=group), mask)[0])
    return out


def compare(a: VerlConfig | None, b: VerlConfig | None, args) -> tuple[float, float]:
    worst, total, count = 0.0, 0.0, 0
    for seed in range(args.seeds):
        for x, y in list(zip(run(a, seed, args.steps, args.groups), run(b, seed, args.steps, args.groups)))[1:]:
            d = (x - y).abs()
            worst = max(worst, float(d.max()))
            total += float(d.sum())
            count += int((x != 0).sum() + (y != 0).sum()) // 2 or 1
    return worst, total / max(count, 1)


def main() -> None:
    import logging

    logging.getLogger("latentx.verl").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--groups", type=int, default=16)
    args = parser.parse_args()
    paper = VerlConfig()
    rows = [
        ("paper vs plain GRPO", paper, None),
        ("`apply_to=last_token` vs paper", VerlConfig(apply_to="last_token"), paper),
        ("`aux_in_reward=true` vs paper", VerlConfig(aux_in_reward=True), paper),
        ("`ema_lag=true` vs paper", VerlConfig(ema_lag=True), paper),
        ("`performance_ema=raw` vs `mapped` (both with `performance_scaling`)",
         VerlConfig(performance_scaling=True, performance_ema="raw"), VerlConfig(performance_scaling=True)),
        ("`dtype=bfloat16` vs float32 (paper)", VerlConfig(dtype="bfloat16"), paper),
        ("`dtype=bfloat16` vs float32 (enabled)", VerlConfig(preset="enabled"),
         VerlConfig(aux_in_reward=True, apply_to="last_token", ema_lag=True, performance_ema="raw")),
        ("release vs plain GRPO", VerlConfig(preset="release"), None),
        ("release vs paper", VerlConfig(preset="release"), paper),
        ("enabled vs paper", VerlConfig(preset="enabled"), paper),
        ("enabled vs plain GRPO", VerlConfig(preset="enabled"), None),
        ("enabled vs `apply_to=last_token` (bonus only, float32, no lag)", VerlConfig(preset="enabled"),
         VerlConfig(apply_to="last_token")),
    ]
    print(f"{args.seeds} seeds x {args.steps} steps x {args.groups} groups of {R}; |Δ token advantage| after step 1\n")
    print("| comparison | max | mean |")
    print("|---|---|---|")
    for label, a, b in rows:
        worst, mean = compare(a, b, args)
        print(f"| {label} | {worst:.3g} | {mean:.3g} |")


if __name__ == "__main__":
    main()
