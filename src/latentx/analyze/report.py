"""Rendering an :class:`~latentx.analyze.pipeline.Analysis`: the self-contained HTML report and the terminal summary."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from latentx.analyze.pipeline import Analysis

__all__ = ["write_html", "print_summary", "KEY_PAIRS", "SUMMARY_FIELDS"]

#: (key of Analysis.summary rows, column header, format)
SUMMARY_FIELDS = [
    ("responses", "responses", "{:d}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("length", "length", "{:.1f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("confidence", "confidence", "{:.3f}"),
    ("er", "ER", "{:.2f}"),
    ("erv", "ERV", "{:+.3f}"),
    ("era", "ERA", "{:+.3f}"),
    ("dsd", "DSD", "{:.4g}"),
    ("spectral_radius", "max |λ|", "{:.3f}"),
    ("modes_outside_unit_circle", "modes |λ| > 1", "{:.1%}"),
    ("cv_er_median", "CV(ER)", "{:.3f}"),
    ("cv_dsd_median", "CV(DSD)", "{:.3f}"),
    ("spectral_w1_median", "W1(spectra)", "{:.4f}"),
]
#: signal pairs whose correlation is printed in the terminal summary
KEY_PAIRS = [("dsd", "entropy"), ("er", "entropy"), ("dsd", "er"), ("confidence", "entropy"), ("er", "length"),
             ("dsd", "length")]
_NAMES = {"dsd": "DSD", "er": "ER", "erv": "ERV", "era": "ERA", "entropy": "entropy", "confidence": "confidence",
          "length": "length"}


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return spec.format(value)


def _pair(analysis: "Analysis", label: str, x: str, y: str, with_n: bool = True) -> str:
    cm = analysis.correlations[label]
    i, j = cm.names.index(x), cm.names.index(y)
    r, lo, hi, n = cm.r[i, j], cm.low[i, j], cm.high[i, j], cm.n[i, j]
    count = f" (n={n})" if with_n else ""
    if not math.isfinite(r):
        return "n/a" + count
    interval = f" [{lo:+.2f},{hi:+.2f}]" if math.isfinite(lo) else ""
    return f"{r:+.2f}{interval}{count}"


def _n_range(analysis: "Analysis", label: str) -> str:
    cm = analysis.correlations[label]
    counts = [int(cm.n[cm.names.index(x), cm.names.index(y)]) for x, y in KEY_PAIRS]
    return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def print_summary(analysis: "Analysis", console: "Console | None" = None) -> None:
    """Key numbers per model (means over responses where the signal is defined) as rich tables.

    Models are columns, so that the tables stay narrow for the usual one to four models.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg, s = analysis.config, analysis.settings
    labels = [row["model"] for row in analysis.summary]
    table = Table(title=f"latent dynamics: {cfg.task}, {cfg.prompts} prompts x R={cfg.samples}, L={cfg.max_new_tokens}, "
                        f"stride {s.stride}, temperature {cfg.temperature}", title_justify="left")
    table.add_column("signal")
    for label in labels:
        table.add_column(label, justify="right", overflow="fold")
    for key, header, spec in SUMMARY_FIELDS:
        table.add_row(header, *[_fmt(row.get(key), spec) for row in analysis.summary])
    console.print(table)
    level = int(round(100 * cfg.ci_level))
    corr = Table(title=f"{cfg.method.capitalize()} correlations, {level}% Fisher-z intervals", title_justify="left")
    corr.add_column("pair")
    for label in analysis.correlations:
        corr.add_column(label, justify="right", overflow="fold")
    for x, y in KEY_PAIRS:
        corr.add_row(f"{_NAMES[x]} ~ {_NAMES[y]}",
                     *[_pair(analysis, label, x, y, with_n=False) for label in analysis.correlations])
    corr.add_row("n (responses)", *[_n_range(analysis, label) for label in analysis.correlations])
    console.print(corr)
    for note in analysis.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    for failure in analysis.failures:
        console.print(f"[red]failed:[/red] {failure}", highlight=False)
    console.print(f"report: {analysis.files['report']}", highlight=False)
    console.print(f"tables: {analysis.files['responses']}, {analysis.files['eigenvalues']} (+ .csv)", highlight=False)


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .85em; margin: .6em 0; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; max-width: 60em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; margin: .3em 0; }
.fail { background: #fdecea; border-left: 4px solid #d93025; padding: .4em .8em; margin: .3em 0; }
code { background: #f5f5f5; padding: 0 .2em; }
dl dt { font-weight: bold; margin-top: .4em; }
"""

_DEFINITIONS = [
    ("ER, ERV, ERA (VERL, arXiv:2509.23808; METHODS.md §1)",
     "ER = exp(−Σ p_j log p_j), p = normalised singular values of the centred response trajectory H (final-layer "
     "hidden states of the response tokens). m_k = ER of the prefix of k·s+1 tokens of the last {window} tokens "
     "(stride s = {stride}); ERV = mean_k (m_k − mean(m_1..m_k−1)), ERA = mean of its increments. Undefined (NaN) for "
     "responses with fewer than 2 (ERV) or 3 (ERA) windows."),
    ("DSD and the Koopman spectrum (ReLaX, arXiv:2512.07558; METHODS.md §2)",
     "Observables g(x) = sigmoid(Wx), W ∈ R^(m×d); K = (G + λI)⁻¹A from the lifted snapshot pairs (EDMD, ridge λ = {ridge}, "
     "Gram scaled by 1/n). DSD = unbiased variance of the m eigenvalue moduli |λ_j(K)|. Residual of an eigenpair: Residual "
     "DMD (Colbrook & Townsend 2024); ∞ for modes the data do not excite. Needs ≥ 3 tokens."),
    ("Token entropy and confidence",
     "entropy = mean over the response's tokens of the entropy (nats) of the policy's next-token distribution; "
     "confidence = mean log-probability of the sampled tokens, (1/T) Σ_t log π(o_t | o_&lt;t) ≤ 0 (exp of it is the "
     "geometric-mean probability of the sampled tokens)."),
    ("Correlations",
     "Spearman ρ (Pearson r of mid-ranks) and Pearson r over the responses where both signals are defined; interval "
     "tanh(atanh(r) ∓ z·se) with se = √(1.06/(n−3)) for Spearman (Fieller, Hartley &amp; Pearson 1957) and 1/√(n−3) for "
     "Pearson. The figure shows {method}; correlations.csv has both."),
    ("Per-input dispersion (the 'dynamical scaling law')",
     "For each prompt, across its R responses: CV(ER) = sd/mean of ER, CV(DSD) = sd/mean of DSD, and W1 spec = mean "
     "over response pairs of the 1-Wasserstein distance between their eigenvalue-modulus distributions "
     "((1/m) Σ_j |ρ_(j) − ρ'_(j)| with sorted moduli). All three use each response's first T_g tokens, T_g the "
     "shortest response of the prompt (columns matched_length, er_matched, dsd_matched), because ER grows and DSD "
     "falls with length. Scale-free, so models of different width compare; lower = the "
     "responses to one input follow more coherent, clustered dynamics. Caveat: each model's DSD and spectra use its "
     "own dictionary unless one --dictionary is shared."),
]


def _table_html(analysis: "Analysis") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in SUMMARY_FIELDS)
    rows = []
    for row in analysis.summary:
        cells = "".join(f"<td>{html.escape(_fmt(row.get(key), spec))}</td>" for key, _, spec in SUMMARY_FIELDS)
        rows.append(f"<tr><td>{html.escape(row['model'])}</td>{cells}</tr>")
    return f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def _models_html(analysis: "Analysis") -> str:
    rows = []
    for result, row in zip(analysis.models, analysis.summary):
        t = row["timings_s"]
        timing = ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
        rows.append(f"<tr><td>{html.escape(result.label)}</td><td>{html.escape(result.spec)}</td>"
                    f"<td>{result.hidden_size}</td><td>{result.m}</td><td>{html.escape(result.dictionary_source)}</td>"
                    f"<td>{row['empty_responses']}</td><td>{html.escape(timing)}</td></tr>")
    return ("<table><tr><th>model</th><th>spec</th><th>hidden size d</th><th>m</th><th>Koopman dictionary</th>"
            f"<th>empty responses</th><th>time</th></tr>{''.join(rows)}</table>")


def _correlations_html(analysis: "Analysis") -> str:
    head = "".join(f"<th>{_NAMES[x]} ~ {_NAMES[y]}</th>" for x, y in KEY_PAIRS)
    rows = [f"<tr><td>{html.escape(label)}</td>" + "".join(
        f"<td>{html.escape(_pair(analysis, label, x, y))}</td>" for x, y in KEY_PAIRS) + "</tr>"
        for label in analysis.correlations]
    return f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def write_html(analysis: "Analysis", path: Path) -> Path:
    """Write the self-contained report (figures embedded as base64 PNG) and return its path."""
    from latentx import __version__
    from latentx.analyze.pipeline import FIGURES

    cfg, s = analysis.config, analysis.settings
    settings = [
        ("models", ", ".join(cfg.models)), ("task", cfg.task + (f" ({cfg.data})" if cfg.data else "")),
        ("prompts × samples", f"{cfg.prompts} × {cfg.samples}"), ("max new tokens", cfg.max_new_tokens),
        ("temperature / top-p", f"{cfg.temperature} / {cfg.top_p}"), ("seed", cfg.seed),
        ("ER stride / window", f"{s.stride} / {s.window}"), ("dictionary size m (when fitted)", s.m),
        ("EDMD ridge / scaling", f"{s.ridge} / {s.scaling}"), ("device", cfg.device),
    ]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>latentx analyze</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Latent-dynamics diagnostics</h1>",
        f"<p>latentx {html.escape(__version__)}, {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; "
        f"{analysis.timings['total']:.0f} s.</p>",
    ]
    parts += [f"<div class='fail'>failed: {html.escape(f)}</div>" for f in analysis.failures]
    parts += [f"<div class='note'>{html.escape(n)}</div>" for n in analysis.notes]
    parts.append("<h2>Settings</h2><table>" + "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in settings) + "</table>")
    parts.append("<h2>Summary</h2><p>Means over the responses where each signal is defined; dispersion columns are "
                 "medians over prompts.</p>" + _table_html(analysis) + _models_html(analysis))
    parts.append(f"<h2>Key correlations</h2>{_correlations_html(analysis)}")
    parts.append("<h2>Figures</h2>")
    for name, png in analysis.figure_png.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'>"
                     f"<figcaption><b>{name}</b> ({html.escape(analysis.figures[name].name)}). "
                     f"{html.escape(FIGURES[name])}</figcaption></figure>")
    if "dispersion" not in analysis.figure_png:
        parts.append("<p><b>dispersion</b>: not drawn; it needs at least 2 responses per prompt (--samples).</p>")
    parts.append("<h2>Definitions</h2><dl>")
    for title, text in _DEFINITIONS:
        body = text.format(window=s.window, stride=s.stride, ridge=s.ridge, method=cfg.method.capitalize())
        parts.append(f"<dt>{html.escape(title)}</dt><dd>{body}</dd>")
    parts.append("</dl><h2>Files</h2><ul>")
    for name, file in analysis.files.items():
        rel = Path(file).name
        parts.append(f"<li><a href='{html.escape(rel)}'>{html.escape(rel)}</a> ({html.escape(name)})</li>")
    parts.append("</ul></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
