"""The study's figures: Pass@k with CI bands, signal trajectories, final metrics, tuning, gradient shares."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from latentx.study.config import SIGNALS

def _color(objective: str, order: list[str]) -> str:
    """The baseline (first entry) in grey, the others in matplotlib's cycle, by their place in the study."""
    index = order.index(objective) if objective in order else len(order)
    return "0.25" if index == 0 else f"C{(index - 1) % 10}"


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Pass@k curves, training signals, final metrics (and the tuning grid): PNG files by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    summary, settings = results["summary"], results["settings"]
    order = [settings["baseline"]] + [o for o in settings["objectives"] if o != settings["baseline"]]
    level = f"{round(settings['level'] * 100)} % CI"
    written: dict[str, Path] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written[name] = out_dir / name

    # Pass@k for every k = 1..n
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = list(range(1, settings["n"] + 1))
    ax.plot(ks, results["start"]["pass_curve"], color="0.6", ls="--", lw=1.2, label="starting policy")
    for objective, entry in summary.items():
        curve = entry["pass_curve"]
        ax.plot(ks, curve["mean"], color=_color(objective, order), lw=1.8, label=objective)
        if len(entry["seeds"]) > 1:
            ax.fill_between(ks, curve["low"], curve["high"], color=_color(objective, order), alpha=0.15)
    ax.set_xscale("log", base=2)
    ticks = [k for k in ks if k & (k - 1) == 0]  # powers of two, written out
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.set_xlabel("k")
    ax.set_ylabel("Pass@k (held out)")
    ax.set_title(f"Pass@k, mean over seeds with {level}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "pass_at_k.png")

    # Training signals over steps
    present = [(key, label) for key, label in SIGNALS if any(f"{key}_trajectory" in e for e in summary.values())]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(3.8 * len(present), 3.3), squeeze=False)
        for ax, (key, label) in zip(axes[0], present):
            for objective, entry in summary.items():
                band = entry.get(f"{key}_trajectory")
                if band is None:
                    continue
                steps = list(range(1, len(band["mean"]) + 1))
                ax.plot(steps, band["mean"], color=_color(objective, order), lw=1.6, label=objective)
                if len(entry["seeds"]) > 1:
                    ax.fill_between(steps, band["low"], band["high"], color=_color(objective, order), alpha=0.15)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        window = settings["smoothing_window"]
        smoothing = f"moving average over {window} steps" if window > 1 else "per step"
        fig.suptitle(f"Rollout signals ({smoothing}), mean over seeds with {level}", fontsize=10)
        save(fig, "signals.png")

    # Final metrics: bars with CI error bars
    import numpy as np

    accuracy = [(k, lbl) for k, lbl in results["headline"] if k != "distinct_correct_per_problem"]
    objectives = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(objectives))
    for j, objective in enumerate(objectives):
        for ax, metrics in ((left, accuracy), (right, [("distinct_correct_per_problem", "")])):
            xs = np.arange(len(metrics)) + (j - (len(objectives) - 1) / 2) * width
            means = [summary[objective][k]["mean"] for k, _ in metrics]
            errors = [0.0 if math.isnan(summary[objective][k]["low"]) else (summary[objective][k]["high"] - summary[objective][k]["low"]) / 2
                      for k, _ in metrics]
            ax.bar(xs, means, width, yerr=errors, capsize=3, color=_color(objective, order), label=objective)
    for i, (key, _) in enumerate(accuracy):
        left.hlines(results["start"][key], i - 0.4, i + 0.4, colors="0.5", linestyles="--", lw=1,
                    label="starting policy" if i == 0 else None)
    right.hlines(results["start"]["distinct_correct_per_problem"], -0.4, 0.4, colors="0.5", linestyles="--", lw=1)
    left.set_xticks(range(len(accuracy)), [lbl for _, lbl in accuracy])
    left.set_ylabel("held-out score")
    left.legend(fontsize=7)
    right.set_xticks([0], ["distinct correct\nper problem"])
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Final metrics, mean over seeds with {level}", fontsize=10)
    save(fig, "final_metrics.png")

    tuning = results.get("tuning")
    if tuning:
        tuned = tuning["objectives"]
        fig, axes = plt.subplots(1, len(tuned), figsize=(3.8 * len(tuned), 3.2), squeeze=False)
        for ax, (objective, entry) in zip(axes[0], tuned.items()):
            labels = [str(e["value"]) for e in entry["grid"]]
            ax.plot(range(len(labels)), [e["mean"] for e in entry["grid"]], "o-", color=_color(objective, order), label="mean")
            for i, e in enumerate(entry["grid"]):
                ax.plot([i] * len(e["scores"]), list(e["scores"].values()), "x", color="0.4", ms=5)
            chosen = labels.index(str(entry["value"]))
            ax.axvline(chosen, color="0.6", ls=":", lw=1)
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel(entry["key"])
            ax.set_title(f"{objective}: validation {tuning['metric']}", fontsize=9)
            ax.grid(alpha=0.3)
        save(fig, "tuning.png")

    relax_like = {o: e["dsd_xi"] for o, e in summary.items() if e.get("dsd_xi")}
    if relax_like:
        fig, axes = plt.subplots(1, len(relax_like), figsize=(max(7.0, 3.9 * len(relax_like)), 3.4), squeeze=False)
        for ax, (objective, series) in zip(axes[0], relax_like.items()):
            steps = list(range(1, len(series["xi_used"]) + 1))
            color = _color(objective, order)
            ax.plot(steps, series["dsd_q50"], color=color, lw=1.4, label="DSD median")
            ax.plot(steps, series["dsd_q90"], color=color, lw=1.0, alpha=0.7, label="DSD q90")
            ax.plot(steps, series["dsd_max"], color=color, lw=0.8, alpha=0.45, label="DSD max")
            ax.plot(steps, series["xi_used"], color="0.2", ls="--", lw=1.2, label="ξ in use")
            ax.set_yscale("log")
            ax.set_title(f"{objective}: DSD and ξ (I = DSD > ξ)", fontsize=9)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3, which="both")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("ReLaX's KL set: the batch's DSD quantiles against the threshold (mean over seeds)", fontsize=10)
        save(fig, "dsd_xi.png")

    shared = {o: e["grad_share"] for o, e in summary.items() if e.get("grad_share")}
    if shared:
        terms = sorted({t for s in shared.values() for t in s})
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(shared) + 2), 3.6))
        bottom = np.zeros(len(shared))
        for j, term in enumerate(terms):
            values = np.array([shared[o].get(term, 0.0) for o in shared])
            ax.bar(range(len(shared)), values, 0.6, bottom=bottom, color=f"C{j % 10}", label=term)
            bottom += values
        ax.set_xticks(range(len(shared)), list(shared), fontsize=8)
        ax.set_ylabel("share of the summed term-gradient norms")
        ax.set_title("What each loss term contributed to the gradient (mean over diagnostic steps and seeds)", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3, axis="y")
        save(fig, "grad_shares.png")
    return written

