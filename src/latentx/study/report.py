"""``report.md``: settings, tables with confidence intervals, power verdicts against the baseline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from latentx.config import atomic_write_text
from latentx.study.config import SIGNALS



def _fmt_ci(entry: dict[str, float], digits: int = 3) -> str:
    if math.isnan(entry["low"]):
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {(entry['high'] - entry['low']) / 2:.{digits}f}"


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _fmt_signed(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.{digits}f}"


def _wall_time_line(invocations: list[dict[str, Any]]) -> str:
    """The study's wall time, summed over the invocations that trained or evaluated something."""
    working = [inv for inv in invocations if inv["runs"] or inv["tuning_runs"]] or invocations[-1:]
    total = sum(inv["wall_time_s"] for inv in working)
    phases = {k: sum(inv["phases_s"][k] for inv in working) for k in ("prepare", "tuning", "runs")}
    runs = sum(inv["runs"] for inv in working)
    tuning = sum(inv["tuning_runs"] for inv in working)
    return (f"Wall time: {total / 60:.1f} min over {len(working)} invocation(s) with "
            f"{working[-1]['workers']} worker(s): warm start and starting-policy evaluation "
            f"{phases['prepare'] / 60:.1f} min, tuning {phases['tuning'] / 60:.1f} min ({tuning} runs), "
            f"study {phases['runs'] / 60:.1f} min ({runs} runs); see `invocations.jsonl`.")


def _verdicts(comparisons: list[dict[str, Any]], baseline: str) -> list[str]:
    """One bullet per objective: each final-metric difference with what the study can say of it —
    "difference found", "no difference larger than X" or "cannot tell (underpowered)" (:func:`latentx.stats.verdict`)."""
    bullets = []
    for objective in dict.fromkeys(c["objective"] for c in comparisons if c["headline"]):
        rows = [c for c in comparisons if c["headline"] and c["objective"] == objective]
        parts = [f"{c['label']} {_fmt_signed(c['diff'])}: {c['verdict_text']}" for c in rows]
        kinds = {c["verdict"] for c in rows}
        found = [c for c in rows if c["verdict"] == "difference found"]
        headline = ("a difference found on " + ", ".join(f"{c['label']} ({_fmt_signed(c['diff'])})" for c in found)
                    if found else "no difference larger than the target on any metric"
                    if kinds == {"no difference larger than"} else "cannot tell on some metrics (underpowered)")
        bullets.append(f"- **{objective}** vs {baseline}: {headline}. " + "; ".join(parts) + ".")
    return bullets


def write_report(results: dict[str, Any], out: Path, plots: dict[str, Path]) -> Path:
    """``report.md``: settings, tables with confidence intervals, significance against the baseline."""
    s, summary = results["settings"], results["summary"]
    level = round(s["level"] * 100)
    seeds = s["seeds"]
    headline = results["headline"]
    baseline = s["baseline"]
    lines = [
        f"# Study: {', '.join(s['objectives'])} on {s['task']}",
        "",
        f"Model `{s['model']}`, {s['steps']} RL steps per run, seeds {', '.join(map(str, seeds))} "
        f"(the same warm start and data for every objective). Held-out evaluation: {s['instances']} instances, "
        f"Mean@1 greedy and {s['n']} samples per problem at temperature {s['eval_temperature']} "
        f"(Pass@k for k = 1..{s['n']} from per-problem correct counts). "
        f"Numbers are mean ± half-width of the {level} % t confidence interval over {len(seeds)} seeds.",
        "",
        f"Training: lr {s['lr']:g}, {s['rollout']['prompts_per_step']} prompts × {s['rollout']['samples_per_prompt']} "
        f"responses per step, up to {s['rollout']['max_new_tokens']} new tokens at temperature "
        f"{s['rollout']['temperature']}; every run's full config is its `config.yaml`.",
        "",
        _wall_time_line(results["invocations"]),
        "",
    ]
    start_rate = results["start"][f"mean@{s['n']}"]
    signal = {o: e["signal_steps"]["mean"] for o, e in summary.items()}
    if start_rate < 0.01 or min(signal.values()) < 0.25:
        lines += [
            f"> **Warning: little learning signal.** The starting policy solves {100 * start_rate:.2f} % of its "
            "samples, and only " + ", ".join(f"{100 * v:.0f} % ({o})" for o, v in signal.items())
            + " of RL steps had a non-zero advantage. GRPO-style objectives learn only from groups with both "
            "right and wrong responses, so with this warm start every objective barely moves and their "
            "differences say little about exploration. Strengthen the warm start (or use an easier task) "
            "before drawing conclusions.",
            "",
        ]
    lines += [
        "## Final held-out metrics",
        "",
        "| objective | " + " | ".join(label for _, label in headline) + " |",
        "|---" * (len(headline) + 1) + "|",
        "| starting policy | " + " | ".join(f"{results['start'][key]:.3f}" for key, _ in headline) + " |",
    ]
    for objective, entry in summary.items():
        lines.append(f"| {objective} | " + " | ".join(_fmt_ci(entry[key]) for key, _ in headline) + " |")
    ks = [k for k in s["ks"] if k <= s["n"]]
    lines += ["", "Pass@k at selected k (the full curve is in `plots/pass_at_k.png` and `results.json`):", "",
              "| objective | " + " | ".join(f"Pass@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|",
              "| starting policy | " + " | ".join(f"{results['start']['pass_curve'][k - 1]:.3f}" for k in ks) + " |"]
    for objective, entry in summary.items():
        curve = entry["pass_curve"]
        cells = [_fmt_ci({key: curve[key][k - 1] for key in ("mean", "low", "high")}) for k in ks]
        lines.append(f"| {objective} | " + " | ".join(cells) + " |")

    comparisons = results["comparisons"]
    if comparisons:
        n_pairs = min(c["n"] for c in comparisons)
        lines += [
            "", f"## Differences against {baseline} (paired by seed)", "",
            f"Difference = objective − {baseline} on the same seed, with its {level} % t interval. "
            f"p-values are two-sided: paired t-test, Wilcoxon signed-rank (exact), and the paired t-test's "
            f"p Holm-adjusted over the {sum(c['headline'] for c in comparisons)} final-metric comparisons. "
            f"Significant means p < {s['alpha']} by the paired t-test.",
            "",
            "| objective | metric | difference | paired t p | Wilcoxon p | Holm p | significant? |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in comparisons:
            if not c["headline"]:
                continue
            ci = "" if math.isnan(c["low"]) else f" [{c['low']:+.3f}, {c['high']:+.3f}]"
            verdict = ("yes" + ("" if c["significant_holm"] else " (not after Holm)")) if c["significant"] else "no (see Power)"
            lines.append(f"| {c['objective']} | {c['label']} | {_fmt_signed(c['diff'])}{ci} | {_fmt_p(c['t_p'])} | "
                         f"{_fmt_p(c['wilcoxon_p'])} | {_fmt_p(c.get('holm_p', math.nan))} | {verdict} |")
        target, power = s.get("target_difference", 0.03), s.get("power", 0.8)
        lines += ["", "**In words.**", ""] + _verdicts(comparisons, baseline)
        lines += ["", f"**Power.** From the observed standard deviation of each paired difference over {n_pairs} seeds: "
                  f"the minimum detectable difference (MDE) at {power:.0%} power (two-sided paired t, level {s['alpha']}) "
                  f"and the seeds a difference of {target:.3f} (the study's target) would need. A comparison is "
                  f"\"no difference larger than MDE\" only where MDE <= {target:.3f}; otherwise it is \"cannot tell\". "
                  f"The exact Wilcoxon test cannot give p below {2 / 2 ** n_pairs:.3g} with {n_pairs} seeds. Where the MDE "
                  "exceeds the target the tests have low power: a non-significant difference there is not evidence "
                  "that the objectives are equal, only that this study cannot tell them apart.", "",
                  "| objective | metric | sd of difference | MDE | seeds for target | verdict |", "|---|---|---|---|---|---|"]
        for c in comparisons:
            if c["headline"]:
                need = "n/a" if c["seeds_for_target"] is None else str(c["seeds_for_target"])
                lines.append(f"| {c['objective']} | {c['label']} | {c['sd']:.4f} | {c['mde']:.3f} | {need} | {c['verdict']} |")

    lines += ["", "## Against the starting policy", "",
              f"Trained minus starting policy (the warm start every run began from), one-sample t-test over seeds; "
              f"`*`: p < {s['alpha']}.", "",
              "| objective | " + " | ".join(label for _, label in headline) + " |",
              "|---" * (len(headline) + 1) + "|"]
    for objective in summary:
        cells = [f"{_fmt_signed(c['diff'])}{' *' if c['significant'] else ''}"
                 for c in results["versus_start"] if c["objective"] == objective]
        lines.append(f"| {objective} | " + " | ".join(cells) + " |")
    bullets = []
    for objective in summary:
        rows = [c for c in results["versus_start"] if c["objective"] == objective and c["significant"]]
        down = [c["label"] for c in rows if c["diff"] < 0]
        up = [c["label"] for c in rows if c["diff"] > 0]
        if down or up:
            bullets += [f"- **{objective}**: RL significantly "
                      + "; ".join(part for part in (f"*lowered* {', '.join(down)}" if down else "",
                                                    f"raised {', '.join(up)}" if up else "") if part)
                      + " relative to the starting policy."]
    lines += [""] + bullets if bullets else []
    if any(c["significant"] and c["diff"] < 0 and c["metric"] == "mean@1_greedy" for c in results["versus_start"]):
        lines += ["", "Where training made the policy worse than where it began, the comparison above says how the "
                  "objectives degrade, not how well they explore."]

    signal_rows = [(key, label) for key, label in SIGNALS if any(f"{key}_final" in e for e in summary.values())]
    if signal_rows:
        lines += ["", "## Training signals", "",
                  "Steps with a learning signal (non-zero advantages): "
                  + ", ".join(f"{o} {_fmt_ci(e['signal_steps'], 2)}" for o, e in summary.items()) + ".", "",
                  f"Mean over the last 10 % of steps of each run, then over seeds ({level} % CI); "
                  f"the trajectories are in `plots/signals.png`. Differences against {baseline}: paired t p in brackets.", "",
                  "| objective | " + " | ".join(label for _, label in signal_rows) + " |",
                  "|---" * (len(signal_rows) + 1) + "|"]
        by_key = {(c["objective"], c["metric"]): c for c in comparisons}
        for objective, entry in summary.items():
            cells = []
            for key, _ in signal_rows:
                if f"{key}_final" not in entry:
                    cells.append("-")
                    continue
                c = by_key.get((objective, f"{key}_final"))
                cells.append(_fmt_ci(entry[f"{key}_final"]) + (f" (p = {_fmt_p(c['t_p'])})" if c else ""))
            lines.append(f"| {objective} | " + " | ".join(cells) + " |")

    noise_keys = list(next(iter(summary.values())).get("noise", {}))
    if noise_keys:
        lines += ["", "## Evaluation noise and seed noise", "",
                  "Per Pass@k: the evaluation noise of one run (standard deviation of a parametric bootstrap of its "
                  f"{s['n']} samples per problem, averaged over seeds) beside the standard deviation across seeds. "
                  "Evaluation noise well below seed noise means more held-out problems would not sharpen the comparison.", "",
                  "| objective | " + " | ".join(f"{k}: eval / seed" for k in noise_keys) + " |", "|---" * (len(noise_keys) + 1) + "|"]
        for objective, entry in summary.items():
            lines.append(f"| {objective} | " + " | ".join(
                f"{entry['noise'][k]['eval_se']:.4f} / {entry['noise'][k]['seed_sd']:.4f}" for k in noise_keys) + " |")
    shares = {o: e["grad_share"] for o, e in summary.items() if e.get("grad_share")}
    if shares:
        terms = sorted({t for v in shares.values() for t in v})
        lines += ["", "## What each loss term did", "",
                  "Share of each term's gradient norm in the sum of the terms' norms, on the `diagnostics.term_grads_every` "
                  "steps, mean over those steps and seeds (`plots/grad_shares.png`).", "",
                  "| objective | " + " | ".join(terms) + " |", "|---" * (len(terms) + 1) + "|"]
        for objective, v in shares.items():
            lines.append(f"| {objective} | " + " | ".join(f"{v.get(t, 0.0):.3f}" for t in terms) + " |")
    kl_rows = {o: e for o, e in summary.items() if "kl_set_size" in e}
    if kl_rows:
        lines += ["", "ReLaX KL set |I| per step (mean over steps, then seeds) and the fraction of steps with |I| > 0: "
                  + "; ".join(f"{o} {_fmt_ci(e['kl_set_size'], 2)} ({100 * e['kl_set_steps']:.0f} % of steps)"
                              for o, e in kl_rows.items()) + "."]

    tuning = results.get("tuning")
    lines += ["", "## Tuning", ""]
    if tuning:
        tuned = tuning["objectives"]
        untuned = [o for o in s["objectives"] if o not in tuned]
        budget = next(iter(tuned.values()))["runs"]
        lines += [
            f"Each tuned objective's main coefficient was chosen on validation seeds "
            f"{', '.join(map(str, tuning['validation_seeds']))} (disjoint from the study seeds), with the same "
            f"budget for each: {budget} runs ({len(next(iter(tuned.values()))['grid'])} values × "
            f"{len(tuning['validation_seeds'])} seeds), by the mean validation `{tuning['metric']}` "
            f"(validation settings: {', '.join(f'`{o}`' for o in tuning['validation_overrides'])}; ties go to "
            "the earlier grid value).",
            "",
            "| objective | parameter | values (mean validation score) | chosen |",
            "|---|---|---|---|",
        ]
        for objective, entry in tuned.items():
            values = ", ".join(f"{e['value']} ({e['mean']:.3f})" for e in entry["grid"])
            lines.append(f"| {objective} | `{entry['key']}` | {values} | {entry['value']} |")
        if untuned:
            lines += ["", f"Not tuned (defaults of the base config): {', '.join(untuned)}"
                      + (f" ({baseline} has no exploration coefficient)" if baseline in untuned else "") + "."]
    else:
        lines += ["No tuning: every objective ran with the coefficients of the base config."]

    lines += ["", "## Plots", ""]
    captions = {"pass_at_k.png": "Pass@k curves", "signals.png": "Training signals",
                "final_metrics.png": "Final metrics", "tuning.png": "Tuning grid", "grad_shares.png": "Gradient shares",
                "dsd_xi.png": "DSD against the threshold xi"}
    for name in plots:
        lines += [f"![{captions.get(name, name)}](plots/{name})", ""]
    train_time = sum(r["train_time_s"] for runs in results["runs"].values() for r in runs.values())
    lines += ["## Cost", "",
              f"Training time summed over runs: {train_time / 60:.1f} min (per-step timings from `metrics.jsonl`); "
              f"{len(s['objectives'])} objectives × {len(seeds)} seeds.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path

