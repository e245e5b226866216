"""Figures of ``latentx analyze`` (matplotlib, object-oriented API: no pyplot global state).

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure`; :func:`png_bytes` renders it.
Quantities and their definitions: METHODS.md §1 (ER, ERV, ERA), §2 (Koopman spectrum, residuals, DSD) and
:mod:`latentx.analyze.stats` (correlations, dispersion).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from latentx.analyze.signals import PrefixSeries
from latentx.analyze.stats import CorrelationMatrix

__all__ = [
    "METRIC_LABELS",
    "PrefixExample",
    "png_bytes",
    "eigenvalue_figure",
    "distribution_figure",
    "correlation_figure",
    "prefix_figure",
    "dispersion_figure",
]

METRIC_LABELS = {
    "dsd": "DSD  Var$_j|\\lambda_j|$",
    "er": "effective rank ER",
    "erv": "ER velocity ERV",
    "era": "ER acceleration ERA",
    "entropy": "mean token entropy (nats)",
    "confidence": "confidence (mean log-prob)",
    "length": "response length (tokens)",
}
SHORT_LABELS = {"dsd": "DSD", "er": "ER", "erv": "ERV", "era": "ERA", "entropy": "entropy",
                "confidence": "confidence", "length": "length"}
CORRECT_COLOR, INCORRECT_COLOR = "#1b9e77", "#d95f02"
_DPI = 100


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (Agg canvas, tight bounding box so that nothing is clipped)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
    return buffer.getvalue()


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max(n, 1), max_cols)
    return math.ceil(max(n, 1) / cols), cols


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------------------------
# Koopman eigenvalues
# ------------------------------------------------------------------------------------------------------


def eigenvalue_figure(spectra: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], max_points: int = 20000) -> Figure:
    """Koopman eigenvalues in the complex plane with the unit circle, coloured by Residual-DMD residual.

    ``spectra``: per model ``(label, real, imag, residual)`` (all responses' modes pooled).  Modes with an
    infinite residual (not seen by the data, e.g. null modes of short responses) are drawn as grey crosses.
    One colour scale for all panels (clipped at the 99th percentile of the finite residuals).
    """
    rows, cols = _grid(len(spectra))
    fig = Figure(figsize=(4.6 * cols + 0.9, 4.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    finite = [r[np.isfinite(r)] for _, _, _, r in spectra]
    pooled = np.concatenate(finite) if finite else np.zeros(0)
    vmax = float(np.quantile(pooled, 0.99)) if len(pooled) else 1.0
    norm = mcolors.Normalize(vmin=0.0, vmax=max(vmax, 1e-6))
    mappable = None
    rng = np.random.default_rng(0)
    theta = np.linspace(0, 2 * np.pi, 400)
    for ax, (label, real, imag, residual) in zip(axes.flat, spectra):
        ok = np.isfinite(real) & np.isfinite(imag)
        real, imag, residual = real[ok], imag[ok], residual[ok]
        if len(real) > max_points:
            keep = rng.choice(len(real), size=max_points, replace=False)
            real, imag, residual = real[keep], imag[keep], residual[keep]
        if not len(real):
            _no_data(ax, f"{label}\nno spectrum (all responses < 3 tokens)")
            continue
        ax.plot(np.cos(theta), np.sin(theta), color="0.3", lw=1.0, ls="--", label="unit circle")
        ax.axhline(0, color="0.85", lw=0.6, zorder=0)
        ax.axvline(0, color="0.85", lw=0.6, zorder=0)
        seen = np.isfinite(residual)
        if (~seen).any():
            ax.scatter(real[~seen], imag[~seen], marker="x", s=10, color="0.6", lw=0.6, label="residual = inf (unseen)")
        if seen.any():
            order = np.argsort(residual[seen])[::-1]  # low residual (trustworthy modes) drawn on top
            mappable = ax.scatter(real[seen][order], imag[seen][order], c=residual[seen][order], cmap="viridis_r",
                                  norm=norm, s=9, alpha=0.75, edgecolors="none")
        reach = max(1.05, float(np.max(np.hypot(real, imag))) * 1.05)
        ax.set_xlim(-reach, reach)
        ax.set_ylim(-reach, reach)
        ax.set_aspect("equal")
        ax.set_xlabel("Re $\\lambda$")
        ax.set_ylabel("Im $\\lambda$")
        ax.set_title(f"{label}  ({len(real)} modes)", fontsize=10)
        ax.legend(loc="lower left", fontsize=7, framealpha=0.8)
    for ax in axes.flat[len(spectra):]:
        ax.set_visible(False)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.85, label="Residual-DMD residual (lower = more reliable)")
    fig.suptitle("Koopman eigenvalues of the response trajectories", fontsize=12)
    return fig


# ------------------------------------------------------------------------------------------------------
# distributions by correctness
# ------------------------------------------------------------------------------------------------------


def distribution_figure(labels: list[str], model: np.ndarray, correct: np.ndarray, metrics: dict[str, np.ndarray]) -> Figure:
    """Box plots (with the points) of each metric per model, split into correct / incorrect responses.

    ``model``: label per response; ``correct``: bool per response; ``metrics``: name -> value per response
    (NaN values, i.e. undefined signals, are left out; the n under each box counts the rest).
    """
    names = list(metrics)
    rows, cols = _grid(len(names), 3)
    width_per_model = 1.2
    fig = Figure(figsize=(max(4.2, 1.3 + width_per_model * len(labels)) * cols, 3.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    rng = np.random.default_rng(0)
    for ax, name in zip(axes.flat, names):
        values = np.asarray(metrics[name], dtype=np.float64)
        any_data = False
        for position, label in enumerate(labels):
            for offset, flag, color in ((-0.2, True, CORRECT_COLOR), (0.2, False, INCORRECT_COLOR)):
                data = values[(model == label) & (correct == flag) & np.isfinite(values)]
                x = position + offset
                if len(data):
                    any_data = True
                    ax.boxplot(data, positions=[x], widths=0.32, showfliers=False, patch_artist=True,
                               boxprops=dict(facecolor=mcolors.to_rgba(color, 0.25), edgecolor=color),
                               medianprops=dict(color=color, lw=1.6), whiskerprops=dict(color=color),
                               capprops=dict(color=color))
                    ax.scatter(x + rng.uniform(-0.09, 0.09, len(data)), data, s=7, color=color, alpha=0.55, lw=0)
                ax.annotate(f"n={len(data)}", (x, 0), xycoords=("data", "axes fraction"), xytext=(0, -2),
                            textcoords="offset points", ha="center", va="top", fontsize=7, color=color)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.tick_params(axis="x", pad=12, length=0)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylabel(METRIC_LABELS.get(name, name), fontsize=9)
        ax.set_title(SHORT_LABELS.get(name, name), fontsize=10)
        if not any_data:
            ax.text(0.5, 0.5, "undefined for every response", ha="center", va="center", transform=ax.transAxes,
                    color="0.4", fontsize=9)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    handles = [Patch(facecolor=mcolors.to_rgba(CORRECT_COLOR, 0.4), edgecolor=CORRECT_COLOR, label="correct"),
               Patch(facecolor=mcolors.to_rgba(INCORRECT_COLOR, 0.4), edgecolor=INCORRECT_COLOR, label="incorrect")]
    fig.legend(handles=handles, loc="outside upper right", ncols=2, fontsize=9)
    fig.suptitle("Latent-dynamics signals of correct vs incorrect responses", fontsize=12)
    return fig


# ------------------------------------------------------------------------------------------------------
# correlation matrices
# ------------------------------------------------------------------------------------------------------


def correlation_figure(matrices: list[tuple[str, CorrelationMatrix]]) -> Figure:
    """Heat map of each model's correlation matrix; every cell shows the coefficient and its interval."""
    rows, cols = _grid(len(matrices), 2)
    k = max((len(cm.names) for _, cm in matrices), default=1)
    size = 0.85 * k + 1.6
    fig = Figure(figsize=(size * cols + 1.0, size * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, (label, cm) in zip(axes.flat, matrices):
        image = ax.imshow(np.nan_to_num(cm.r, nan=0.0), cmap="RdBu_r", vmin=-1, vmax=1)
        ticks = [SHORT_LABELS.get(name, name) for name in cm.names]
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(ticks)))
        ax.set_yticklabels(ticks, fontsize=8)
        for i in range(len(ticks)):
            for j in range(len(ticks)):
                if i == j:
                    continue
                r, lo, hi = cm.r[i, j], cm.low[i, j], cm.high[i, j]
                text = "n/a" if not np.isfinite(r) else f"{r:+.2f}" + ("" if not np.isfinite(lo) else f"\n[{lo:+.2f},{hi:+.2f}]")
                ax.text(j, i, text, ha="center", va="center", fontsize=6.2,
                        color="white" if np.isfinite(r) and abs(r) > 0.6 else "black")
        off = cm.n[~np.eye(len(ticks), dtype=bool)]
        n_text = f"n = {int(off.min())}" if off.size and off.min() == off.max() else (
            f"n = {int(off.min())}-{int(off.max())}" if off.size else "n = 0")
        ax.set_title(f"{label}: {cm.method.capitalize()}, {n_text}", fontsize=10)
    for ax in axes.flat[len(matrices):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, label="correlation coefficient")
    level = int(round(100 * matrices[0][1].level)) if matrices else 95
    fig.suptitle(f"Correlations between signals (cells: coefficient and {level}% Fisher-z interval)", fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------------------
# ER prefix curves
# ------------------------------------------------------------------------------------------------------


@dataclass
class PrefixExample:
    """One response's prefix ER series plus what the panel title needs."""

    label: str
    response_id: int
    series: PrefixSeries
    length: int
    erv: float
    era: float
    correct: bool


def _fmt(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:+.3g}"


def prefix_figure(examples: list[PrefixExample]) -> Figure:
    """ER of growing prefixes of a few responses, with the stride windows m_k of METHODS.md §1 marked."""
    labels = list(dict.fromkeys(e.label for e in examples))
    per_model = [[e for e in examples if e.label == label] for label in labels]
    cols = max((len(p) for p in per_model), default=1)
    rows = max(len(labels), 1)
    fig = Figure(figsize=(4.3 * cols, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, group in enumerate(per_model):
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(group):
                ax.set_visible(False)
                continue
            e = group[c]
            s = e.series
            offset = s.tail_start  # plot against the token position in the whole response
            ax.plot(offset + s.dense_sizes, s.dense_er, color="0.55", lw=1.2, label="ER of prefix")
            for size in s.window_sizes:
                ax.axvline(offset + size, color="#7570b3", lw=0.6, ls=":", alpha=0.8)
            ax.plot(offset + s.window_sizes, s.window_er, "o-", color="#7570b3", ms=4, lw=1.2,
                    label=f"windows $m_k$ (stride {s.stride})")
            if offset:
                ax.axvspan(0, offset, color="0.92", label="outside tail window")
            outcome = "correct" if e.correct else "incorrect"
            ax.set_title(f"{e.label} #{e.response_id} ({outcome}, {e.length} tok)\nERV {_fmt(e.erv)}, ERA {_fmt(e.era)}",
                         fontsize=9)
            ax.set_xlabel("prefix length (tokens)")
            ax.set_ylabel("effective rank")
            ax.legend(fontsize=7, loc="lower right")
    if not examples:
        _no_data(axes[0, 0], "no response is long enough for a prefix window")
    fig.suptitle("Effective rank of growing prefixes (METHODS.md §1)", fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------------------
# dispersion across responses of one input
# ------------------------------------------------------------------------------------------------------

DISPERSION_LABELS = {
    "cv_er": "CV of ER across responses",
    "cv_dsd": "CV of DSD across responses",
    "spectral_w1": "mean pairwise W1 of |$\\lambda$| spectra",
}


def dispersion_figure(labels: list[str], tables: dict[str, dict[str, np.ndarray]]) -> Figure:
    """Per-prompt dispersion of the dynamics across its R responses, one box per model.

    ``tables[label]``: the :func:`latentx.analyze.stats.group_dispersion` columns of one model.  The same
    prompt is joined by a thin line across models (the prompts are the same problems for every model).
    """
    measures = list(DISPERSION_LABELS)
    fig = Figure(figsize=(max(4.0, 1.2 + 1.1 * len(labels)) * len(measures), 3.9), layout="constrained")
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    palette = [mcolors.to_rgba(c) for c in ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")]
    for ax, measure in zip(axes, measures):
        matrix = np.full((max((len(t["group"]) for t in tables.values()), default=0), len(labels)), np.nan)
        for j, label in enumerate(labels):
            values = np.asarray(tables[label][measure], dtype=np.float64)
            matrix[: len(values), j] = values
        for row in matrix:
            ok = np.isfinite(row)
            if ok.sum() >= 2:
                ax.plot(np.nonzero(ok)[0], row[ok], color="0.8", lw=0.6, zorder=1)
        counts = []
        for j, label in enumerate(labels):
            data = matrix[:, j][np.isfinite(matrix[:, j])]
            color = palette[j % len(palette)]
            if len(data):
                ax.boxplot(data, positions=[j], widths=0.45, showfliers=False, patch_artist=True, zorder=2,
                           boxprops=dict(facecolor=(*color[:3], 0.25), edgecolor=color),
                           medianprops=dict(color=color, lw=1.8))
                ax.scatter(np.full(len(data), j), data, s=10, color=color, zorder=3, lw=0)
            counts.append(len(data))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"{label}\n{n} prompts" for label, n in zip(labels, counts)], fontsize=8)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylabel(DISPERSION_LABELS[measure], fontsize=9)
        ax.set_ylim(bottom=0)
    handles = [Line2D([], [], color="0.8", lw=0.8, label="same prompt"),
               Line2D([], [], color="0.3", marker="o", lw=0, ms=3, label="one prompt")]
    fig.legend(handles=handles, loc="outside upper right", ncols=2, fontsize=8)
    fig.suptitle("Per-input dispersion of the latent dynamics (lower = more coherent)", fontsize=11)
    return fig
