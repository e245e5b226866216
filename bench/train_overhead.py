"""Step time of ``grpo`` vs ``relax`` vs ``verl`` on the demo configuration, in one run, as ratios.

    .venv/bin/python bench/train_overhead.py [--steps 12] [--warmup 2]

The GRPO baseline computes no latent signal at all (``signals.monitor=false``); ReLaX and VERL compute
only what their objective needs.  All three start from the same warm-started tiny model and draw the
same prompts; the first ``--warmup`` steps (which include ReLaX's one-off dictionary fit) are timed
separately.  Target (issue "latentx train"): signals and objectives add at most 10 % over GRPO on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from latentx.config import apply_overrides
from latentx.trainer import TrainConfig, Trainer, resolve_config


def time_objective(objective: str, steps: int, warmup: int, root: str, extra: list[str]) -> dict:
    cfg = apply_overrides(
        TrainConfig(),
        [f"objective={objective}", f"steps={steps + warmup}", f"out={root}/{objective}", "eval.enabled=false",
         "signals.monitor=false", f"checkpoint_every={10**6}", *extra],
    )
    trainer = Trainer(resolve_config(cfg), progress=False, log=lambda *a: None)
    rows = [trainer.train_step() for _ in range(steps + warmup)]
    timed = rows[warmup:]
    return {
        "first_steps_s": sum(r["time_step"] for r in rows[:warmup]),
        "step_s": statistics.median(r["time_step"] for r in timed),
        "signals_s": statistics.median(r["time_signals"] for r in timed),
        "update_s": statistics.median(r["time_update"] for r in timed),
        "generate_s": statistics.median(r["time_generate"] for r in timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as root:
        results = {obj: time_objective(obj, args.steps, args.warmup, root, args.extra) for obj in ("grpo", "relax", "verl")}
    base = results["grpo"]["step_s"]
    print(f"median over {args.steps} steps after {args.warmup} warm-up steps; torch threads = {torch.get_num_threads()}")
    print(f"{'objective':<10} {'step s':>8} {'generate s':>11} {'signals s':>10} {'update s':>9} {'first steps s':>14} {'vs grpo':>8}")
    for name, r in results.items():
        print(f"{name:<10} {r['step_s']:>8.3f} {r['generate_s']:>11.3f} {r['signals_s']:>10.3f} {r['update_s']:>9.3f} "
              f"{r['first_steps_s']:>14.2f} {r['step_s'] / base:>7.2f}x")


if __name__ == "__main__":
    main()
