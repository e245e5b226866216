"""``latentx plot``: the training curves of one or several runs overlaid, one PNG per panel + index.html.

The one plotting path of latentx: ``latentx train`` calls :func:`plot_runs` on its own run directory at
the end (``<run>/plots``), and ``latentx plot RUN [RUN ...] --out DIR`` on any set of runs to compare
them (relax vs grpo, several seeds).  Inputs are each run's ``metrics.jsonl`` (training curves) and
``summary.json`` (held-out evaluation).  Panels:

- one per training metric in :data:`CURVES` that at least one run logged (reward, accuracy, entropy,
  DSD, ER / ERV / ERA, length, loss terms, gradient norm, time per step): the per-step values thin, a
  moving average thick, one colour and one legend entry per run (with a single run, a ±1 std band over
  the step's responses where the run logged ``<metric>_std``);
- ``grad_shares.png`` / ``grad_cos_pg.png`` when the runs logged per-term gradient diagnostics
  (``diagnostics.term_grads_every``: ``grad_share/<term>``, ``grad_cos_pg/<term>``), one line per term
  and run;
- ``pass_at_k.png``: held-out Pass@k against k from each run's summary, after RL (solid) and for the
  starting policy (dashed), when the summaries have them.

``index.html`` shows the runs, their held-out numbers and every panel.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import typer

__all__ = ["CURVES", "TERM_PANELS", "RunData", "load_run", "plot_runs", "plot_command", "GRAD_SHARE_PREFIX"]

#: (file stem, title, y-axis label, metrics.jsonl key); one PNG per entry that some run logged.
CURVES: list[tuple[str, str, str, str]] = [
    ("reward", "Mean reward of the rollouts", "reward", "reward_mean"),
    ("accuracy", "Training accuracy (verifier)", "fraction of responses correct", "accuracy"),
    ("group_pass_rate", "Prompts with a correct response", "fraction of groups", "group_pass_rate"),
    ("entropy", "Token entropy of the rollouts", "entropy (nats)", "entropy_mean"),
    ("dsd", "Dynamic spectral dispersion (DSD)", "DSD", "dsd_mean"),
    ("er", "Effective rank of the hidden states (ER)", "ER", "er_mean"),
    ("erv", "ER velocity (ERV)", "ERV", "erv_mean"),
    ("era", "ER acceleration (ERA)", "ERA", "era_mean"),
    ("length", "Response length", "tokens", "length_mean"),
    ("loss", "Total loss", "loss", "loss"),
    ("pg", "Policy-gradient term", "loss term", "pg"),
    ("xp", "ReLaX exploration term L_xp", "loss term", "xp"),
    ("kl", "KL to the reference", "KL", "kl"),
    ("grad_norm", "Gradient norm (before clipping)", "L2 norm", "grad_norm"),
    ("time_step", "Wall time per RL step", "seconds", "time_step"),
]

#: per-term gradient diagnostics: (file stem, metrics.jsonl prefix of ``<prefix><term>``, title, y label)
TERM_PANELS: list[tuple[str, str, str, str]] = [
    ("grad_shares", "grad_share/", "Share of the gradient norm per loss term", "share of the sum of term norms"),
    ("grad_cos_pg", "grad_cos_pg/", "Cosine of each term's gradient with the PG gradient", "cosine"),
]
GRAD_SHARE_PREFIX = TERM_PANELS[0][1]


@dataclass
class RunData:
    """One run directory's curves and summary."""

    path: Path
    label: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def load_run(path: str | os.PathLike, label: str | None = None) -> RunData:
    """Read ``metrics.jsonl`` (required) and ``summary.json`` (optional) of a run directory."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl here; is it a latentx run directory?")
    rows = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{metrics}:{number}: not a JSON line") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{metrics}:{number}: a row needs a 'step' field")
        rows.append(row)
    summary = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path / 'summary.json'}: not valid JSON") from None
    return RunData(path=path, label=label or path.resolve().name, rows=rows, summary=summary)


def _unique_labels(runs: list[RunData]) -> None:
    """Runs with the same directory name get their parent folder in front (``seed0/relax``)."""
    names = [r.label for r in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = f"{run.path.resolve().parent.name}/{run.label}"


def moving_average(values: Sequence[float], width: int) -> list[float]:
    """Trailing moving average: entry i is the mean of ``values[max(0, i − width + 1) : i + 1]``."""
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > width:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(int(row["step"]))
            ys.append(float(value))
    return xs, ys


def _draw(ax, xs: list[int], ys: list[float], color: str, label: str, smooth: int) -> int:
    """One run's curve; returns the moving-average width drawn (1: none)."""
    width = smooth if smooth > 0 else max(3, len(ys) // 10)
    if len(ys) >= 5 and width > 1:
        ax.plot(xs, ys, color=color, lw=0.8, alpha=0.3)
        ax.plot(xs, moving_average(ys, width), color=color, lw=2, label=label)
        return width
    ax.plot(xs, ys, color=color, lw=1.5, marker="o", ms=3, label=label)
    return 1


def _figure():
    """A new figure and axes (matplotlib is imported here, so that the CLI starts fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0))


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label_step_axes(ax, title: str, ylabel: str) -> None:
    """Title, the integer "RL step" x axis, y label, grid and legend of a per-step panel."""
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _curve_panel(runs: list[RunData], key: str, title: str, ylabel: str, out: Path, smooth: int) -> Path | None:
    if not any(_series(r.rows, key)[0] for r in runs):
        return None
    fig, ax = _figure()
    widths = set()
    # one moving-average width for every run (a tenth of the longest), so that the curves compare
    smooth = smooth if smooth > 0 else max(3, max(len(_series(r.rows, key)[1]) for r in runs) // 10)
    for i, run in enumerate(runs):
        xs, ys = _series(run.rows, key)
        if not xs:
            continue
        color = f"C{i % 10}"
        widths.add(_draw(ax, xs, ys, color, run.label, smooth))
        std_key = key[: -len("_mean")] + "_std" if key.endswith("_mean") else None
        if len(runs) == 1 and std_key:
            sx, sd = _series(run.rows, std_key)
            if sx == xs:
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                                color=color, alpha=0.12, label="±1 std over responses")
    _label_step_axes(ax, title, ylabel)
    if max(widths, default=1) > 1:
        ax.text(1.0, -0.13, f"thin: per step; thick: moving average over {max(widths)} steps", fontsize=7,
                color="0.4", transform=ax.transAxes, va="top", ha="right")
    return _save(fig, out)


def _term_panel(runs: list[RunData], prefix: str, title: str, ylabel: str, out: Path, smooth: int) -> Path | None:
    terms = sorted({k[len(prefix):] for r in runs for row in r.rows for k in row if k.startswith(prefix)})
    if not terms:
        return None
    fig, ax = _figure()
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        for j, term in enumerate(terms):
            xs, ys = _series(run.rows, prefix + term)
            if not xs:
                continue
            width = smooth if smooth > 0 else 1
            ax.plot(xs, moving_average(ys, width), color=f"C{(i * len(terms) + j) % 10}", ls=styles[i % len(styles)],
                    lw=1.6, marker="o" if len(xs) < 30 else None, ms=3,
                    label=f"{run.label}: {term}" if len(runs) > 1 else term)
    _label_step_axes(ax, title, ylabel)
    return _save(fig, out)


def _pass_at_k(result: dict[str, Any] | None) -> tuple[list[int], list[float]]:
    from latentx.reporting import headline

    table = headline(result).get("pass@k") or {}
    pairs = sorted((int(k), float(v)) for k, v in table.items())
    return [k for k, _ in pairs], [v for _, v in pairs]


def _pass_at_k_panel(runs: list[RunData], out: Path) -> Path | None:
    if not any(_pass_at_k(r.summary.get("eval"))[0] for r in runs):
        return None
    fig, ax = _figure()
    all_k: set[int] = set()
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        ks, ys = _pass_at_k(run.summary.get("eval"))
        if ks:
            ax.plot(ks, ys, color=color, lw=2, marker="o", label=f"{run.label} after RL")
            all_k.update(ks)
        ks0, ys0 = _pass_at_k((run.summary.get("warm_start") or {}).get("eval"))
        if ks0:
            ax.plot(ks0, ys0, color=color, lw=1.2, ls="--", marker="s", ms=4, label=f"{run.label} start")
            all_k.update(ks0)
    if len(all_k) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_k), [str(k) for k in sorted(all_k)])
    ax.set_ylim(-0.02, 1.02)
    from latentx.reporting import headline

    n = {str(headline(r.summary.get("eval")).get("instances", "?")) for r in runs if r.summary.get("eval")}
    ax.set_title(f"Held-out Pass@k ({'/'.join(sorted(n))} problems)")
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("Pass@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out)


def _index_html(runs: list[RunData], images: list[Path], out_dir: Path) -> Path:
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))

    from latentx.reporting import headline

    ks = sorted({k for r in runs for k in (headline(r.summary.get("eval")).get("pass@k") or {})}, key=int)
    head = ["run", "objective", "steps", "Mean@1 greedy"] + [f"Pass@{k}" for k in ks]
    lines = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for run in runs:
        ev = headline(run.summary.get("eval"))
        last = run.rows[-1]["step"] if run.rows else 0
        values = [run.label, run.summary.get("objective", "?"), run.summary.get("steps", last),
                  ev.get("mean@1_greedy", "-")] + [(ev.get("pass@k") or {}).get(k, "-") for k in ks]
        lines.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in values) + "</tr>")
    figures = "\n".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}"></figure>' for p in images
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>latentx runs</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}} figure{{display:inline-block;margin:.4em}}
img{{width:560px}}</style></head><body>
<h1>latentx runs</h1>
<p>{"<br>".join(html.escape(f"{r.label}: {r.path}") for r in runs)}</p>
<table>{"".join(lines)}</table>
{figures}
</body></html>
"""
    path = out_dir / "index.html"
    path.write_text(page)
    return path


def plot_runs(
    runs: Sequence[str | os.PathLike | RunData], out_dir: str | os.PathLike,
    labels: Sequence[str] | None = None, smooth: int = 0,
) -> list[Path]:
    """Write the panels of ``runs`` (directories or :class:`RunData`) into ``out_dir``; returns the PNG
    paths followed by ``index.html``.  ``smooth``: moving-average width in steps (0: a tenth of the run)."""
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"--label given {len(labels)} times for {len(runs)} runs")
    data = [r if isinstance(r, RunData) else load_run(r) for r in runs]
    if labels is not None:
        for run, label in zip(data, labels):
            run.label = label
    else:
        _unique_labels(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    for stem, title, ylabel, key in CURVES:
        path = _curve_panel(data, key, title, ylabel, out_dir / f"{stem}.png", smooth)
        if path is not None:
            images.append(path)
    for stem, prefix, title, ylabel in TERM_PANELS:
        path = _term_panel(data, prefix, title, ylabel, out_dir / f"{stem}.png", smooth)
        if path is not None:
            images.append(path)
    path = _pass_at_k_panel(data, out_dir / "pass_at_k.png")
    if path is not None:
        images.append(path)
    return images + [_index_html(data, images, out_dir)]


def plot_command(
    runs: list[Path] = typer.Argument(..., help="run directories (with metrics.jsonl) to overlay"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the PNGs and index.html"),
    label: list[str] = typer.Option([], "--label", help="legend name per run, in order (default: folder names)"),
    smooth: int = typer.Option(0, help="moving-average width in steps (0: a tenth of the run)"),
) -> None:
    """Plot the training curves of one or more runs overlaid (one PNG per panel + index.html)."""
    try:
        written = plot_runs(runs, out, labels=label or None, smooth=smooth)
    except (FileNotFoundError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    typer.echo(f"{len(written) - 1} panels of {len(runs)} run(s): {written[-1]}")
