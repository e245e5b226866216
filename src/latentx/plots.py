"""Training-curve plots (PNG) from a run's ``metrics.jsonl`` rows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: (file name, title, [(metric key, label), ...]) — one figure per row, one panel per metric.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("reward.png", "Reward and accuracy", [("reward_mean", "mean reward"), ("accuracy", "accuracy"),
                                           ("group_pass_rate", "groups with a correct response")]),
    ("signals.png", "Exploration signals of the rollouts", [
        ("entropy_mean", "token entropy"), ("dsd_mean", "DSD"), ("er_mean", "effective rank"),
        ("erv_mean", "ER velocity"), ("era_mean", "ER acceleration"), ("length_mean", "response length")]),
    ("loss.png", "Loss terms", [("loss", "total loss"), ("pg", "policy gradient"), ("xp", "ReLaX L_xp"),
                                ("kl", "KL to reference"), ("adv_abs_mean", "mean |advantage|"),
                                ("grad_norm", "gradient norm")]),
    ("timing.png", "Time per step (s)", [("time_step", "step"), ("time_generate", "generation"),
                                         ("time_signals", "signals"), ("time_update", "update")]),
]


def _smooth(values: Sequence[float], width: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > width:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_training_curves(rows: list[dict], out_dir: str | os.PathLike, title: str = "") -> list[Path]:
    """Write one PNG per panel group; metrics missing from every row are left out. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    steps = [r["step"] for r in rows]
    for filename, heading, metrics in PANELS:
        present = [(k, label) for k, label in metrics if any(k in r for r in rows)]
        if not present:
            continue
        cols = min(3, len(present))
        nrows = (len(present) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
        for ax, (key, label) in zip(axes.flat, present):
            xs = [s for s, r in zip(steps, rows) if key in r]
            ys = [float(r[key]) for r in rows if key in r]
            ax.plot(xs, ys, color="0.75", lw=1, label="per step")
            if len(ys) >= 5:
                ax.plot(xs, _smooth(ys, max(3, len(ys) // 10)), color="C0", lw=2, label="moving average")
            std_key = key.replace("_mean", "_std")
            if std_key != key and any(std_key in r for r in rows):
                std = [float(r.get(std_key, 0.0)) for r in rows if key in r]
                ax.fill_between(xs, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)],
                                color="C0", alpha=0.12, label="±1 std over responses")
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"{heading}{' — ' + title if title else ''}", fontsize=11)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
