"""Aggregation: per-run records (read once from the run directories) to the study's results, a pure
function of numbers (tested on synthetic per-seed records without any run)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from latentx.config import to_dict
from latentx.plots import moving_average
from latentx.study.config import EVAL_FILE, SIGNALS
from latentx.study.evaluation import metric_value

if TYPE_CHECKING:
    from latentx.study.config import StudyConfig
    from latentx.trainer import TrainConfig

#: metrics.jsonl keys written on ``diagnostics.term_grads_every`` steps: ``grad_share/<term>``
GRAD_SHARE_PREFIX = "grad_share/"
#: ReLaX's KL-set size |I| per step
KL_SET_KEY = "kl_set_size"
#: ReLaX's per-step DSD quantiles and the ξ in use (the KL set is {DSD > ξ}): drawn together per objective
DSD_XI_KEYS = ("dsd_q50", "dsd_q90", "dsd_max", "xi_used")



def headline_metrics(n: int) -> list[tuple[str, str]]:
    """(key, label) of the final metrics in the main table."""
    ks = sorted({min(8, n), n})
    return ([("mean@1_greedy", "Mean@1 (greedy)"), (f"mean@{n}", f"Mean@{n}")]
            + [(f"pass@{k}", f"Pass@{k}") for k in ks if k > 1]
            + [("distinct_correct_per_problem", "distinct correct / problem")])


def _interval_dict(values: list[float], level: float) -> dict[str, float]:
    from latentx.stats import t_interval

    ci = t_interval(values, level)
    return {"mean": ci.mean, "low": ci.low, "high": ci.high, "std": ci.std, "n": ci.n}


def load_records(jobs: dict[tuple[str, int], "Any"], n: int) -> dict[str, dict[int, dict[str, Any]]]:
    """Read every finished run once: its held-out evaluation and its training metrics, reduced to the
    per-run record :func:`aggregate` works on (``{label: {seed: record}}``)."""
    from latentx.trainer import read_metrics

    per_run: dict[str, dict[int, dict[str, Any]]] = {}
    for (objective, seed), job in jobs.items():
        ev = json.loads((job.run_dir / EVAL_FILE).read_text())
        per_run.setdefault(objective, {})[seed] = run_record(ev, read_metrics(job.run_dir), n)
    return per_run


def run_record(ev: dict[str, Any], rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """One run's numbers: headline metrics, Pass@k curve, evaluation noise, timings, signal series,
    per-term gradient shares and the ReLaX KL-set size over training (when the run logged them)."""
    import numpy as np

    from latentx.stats import pass_at_k_curve, pass_at_k_eval_se

    headline = headline_metrics(n)
    record: dict[str, Any] = {key: metric_value(ev, key) for key, _ in headline}
    record["pass_curve"] = pass_at_k_curve(ev["correct_counts"], ev["n"]).tolist()
    record["eval_se"] = {key: pass_at_k_eval_se(ev["correct_counts"], ev["n"], int(key[len("pass@"):]))
                         for key, _ in headline if key.startswith("pass@")}
    record["train_time_s"] = float(sum(r.get("time_step", 0.0) for r in rows))
    record["eval_time_s"] = float(ev.get("time_s", 0.0))
    # steps whose advantages were not all zero: the policy gradient had something to follow
    record["signal_steps"] = float(np.mean([r.get("adv_abs_mean", 0.0) > 0 for r in rows])) if rows else 0.0
    tail = max(1, len(rows) // 10)
    for key, _ in SIGNALS:
        series = [float(r[key]) for r in rows if key in r]
        if series:
            record[f"{key}_series"] = series
            record[f"{key}_final"] = float(np.mean(series[-tail:]))
    shares: dict[str, list[float]] = {}
    for r in rows:
        for key, value in r.items():
            if key.startswith(GRAD_SHARE_PREFIX) and isinstance(value, (int, float)) and math.isfinite(value):
                shares.setdefault(key[len(GRAD_SHARE_PREFIX):], []).append(float(value))
    if shares:
        record["grad_share"] = {term: float(np.mean(v)) for term, v in shares.items()}
    for key in DSD_XI_KEYS:
        series = [float(r[key]) for r in rows if key in r]
        if series:
            record[f"{key}_series"] = series
    sizes = [float(r[KL_SET_KEY]) for r in rows if KL_SET_KEY in r]
    if sizes:
        record["kl_set_size"] = float(np.mean(sizes))
        record["kl_set_steps"] = float(np.mean([s > 0 for s in sizes]))
    return record


def aggregate(base: "TrainConfig", study: "StudyConfig", per_run: dict[str, dict[int, dict[str, Any]]],
              start_eval: dict[str, Any], choice: dict[str, Any] | None) -> dict[str, Any]:
    """Everything the report states, as plain JSON-able numbers, from per-run records alone (no I/O):
    per-objective intervals over seeds, paired comparisons against the baseline with their power
    verdicts (:func:`latentx.stats.verdict`), comparisons against the starting policy, and the
    evaluation noise beside the seed-to-seed spread."""
    import numpy as np

    from latentx.stats import holm, paired_test, pass_at_k_curve, verdict

    n, level = base.eval.n, study.level
    headline = headline_metrics(n)
    summary: dict[str, dict[str, Any]] = {}
    width = max(1, base.steps // 15)
    for objective, runs in per_run.items():
        seeds = sorted(runs)
        entry: dict[str, Any] = {key: _interval_dict([runs[s][key] for s in seeds], level) for key, _ in headline}
        curves = np.array([runs[s]["pass_curve"] for s in seeds])
        entry["pass_curve"] = {k: [] for k in ("mean", "low", "high")}
        for column in curves.T:
            ci = _interval_dict(column.tolist(), level)
            for k in ("mean", "low", "high"):
                entry["pass_curve"][k].append(ci[k])
        for key, _ in SIGNALS:
            if all(f"{key}_series" in runs[s] for s in seeds):
                entry[f"{key}_final"] = _interval_dict([runs[s][f"{key}_final"] for s in seeds], level)
                length = min(len(runs[s][f"{key}_series"]) for s in seeds)
                series = np.array([moving_average(runs[s][f"{key}_series"][:length], width) for s in seeds])
                band = [_interval_dict(col.tolist(), level) for col in series.T]
                entry[f"{key}_trajectory"] = {k: [b[k] for b in band] for k in ("mean", "low", "high")}
        if all(f"{key}_series" in runs[s] for key in DSD_XI_KEYS for s in seeds):  # ReLaX runs: DSD beside ξ
            length = min(len(runs[s][f"{key}_series"]) for key in DSD_XI_KEYS for s in seeds)
            entry["dsd_xi"] = {key: np.mean([runs[s][f"{key}_series"][:length] for s in seeds], axis=0).tolist()
                               for key in DSD_XI_KEYS}
        entry["signal_steps"] = _interval_dict([runs[s]["signal_steps"] for s in seeds], level)
        # evaluation noise (the n samples per problem) beside the seed-to-seed spread, per Pass@k
        entry["noise"] = {key: {"eval_se": float(np.mean([runs[s]["eval_se"][key] for s in seeds])),
                                "seed_sd": entry[key]["std"]} for key in runs[seeds[0]]["eval_se"]}
        terms = sorted({t for s in seeds for t in runs[s].get("grad_share", {})})
        if terms:
            entry["grad_share"] = {t: float(np.mean([runs[s]["grad_share"].get(t, 0.0) for s in seeds])) for t in terms}
        if all("kl_set_size" in runs[s] for s in seeds):
            entry["kl_set_size"] = _interval_dict([runs[s]["kl_set_size"] for s in seeds], level)
            entry["kl_set_steps"] = float(np.mean([runs[s]["kl_set_steps"] for s in seeds]))
        entry["seeds"] = seeds
        summary[objective] = entry

    comparisons = []
    baseline = per_run.get(study.baseline, {})
    for objective in study.objectives:
        if objective == study.baseline:
            continue
        seeds = sorted(set(per_run[objective]) & set(baseline))
        for key, label in headline + [(f"{k}_final", f"final {lbl}") for k, lbl in SIGNALS]:
            if not seeds or any(key not in per_run[objective][s] or key not in baseline[s] for s in seeds):
                continue
            test = paired_test([per_run[objective][s][key] for s in seeds], [baseline[s][key] for s in seeds], level)
            said = verdict(test, study.target_difference, study.alpha, study.power)
            comparisons.append({
                "objective": objective, "metric": key, "label": label, "n": test.n, "headline": not key.endswith("_final"),
                "diff": test.diff.mean, "low": test.diff.low, "high": test.diff.high, "t_stat": test.t_stat,
                "t_p": test.t_p, "wilcoxon_p": test.wilcoxon_p, "wilcoxon_min_p": test.wilcoxon_min_p,
                "sd": test.diff.std, "verdict": said.kind, "verdict_text": said.text, "mde": said.mde,
                "seeds_for_target": said.seeds_for_target,
            })
    family = [c for c in comparisons if c["headline"]]
    for c, adjusted in zip(family, holm([c["t_p"] for c in family])):
        c["holm_p"] = adjusted
    for c in comparisons:
        c["significant"] = bool(c["t_p"] < study.alpha)
        c["significant_holm"] = bool(c.get("holm_p", math.nan) < study.alpha)

    start = {key: metric_value(start_eval, key) for key, _ in headline}
    start["pass_curve"] = pass_at_k_curve(start_eval["correct_counts"], start_eval["n"]).tolist()
    # Did RL move the policy at all?  One-sample t-test of the per-seed values against the starting
    # policy's single (deterministic) evaluation.
    versus_start = []
    for objective, runs in per_run.items():
        for key, label in headline:
            seeds = sorted(runs)
            test = paired_test([runs[s][key] for s in seeds], [start[key]] * len(seeds), level)
            versus_start.append({"objective": objective, "metric": key, "label": label, "diff": test.diff.mean,
                                 "low": test.diff.low, "high": test.diff.high, "t_p": test.t_p,
                                 "significant": bool(test.t_p < study.alpha)})
    return {
        "settings": {
            "task": base.task.name, "model": base.model.name, "steps": base.steps, "n": n,
            "instances": base.eval.instances, "eval_temperature": base.eval.temperature, "eval_seed": base.eval.seed,
            "ks": list(base.eval.ks), "objectives": study.objectives, "seeds": study.seeds, "level": level,
            "alpha": study.alpha, "baseline": study.baseline, "smoothing_window": width,
            "target_difference": study.target_difference, "power": study.power,
            "variants": {label: list(o) for label, o in study.variants.items()},
            "rollout": to_dict(base.rollout), "lr": base.optim.lr,
        },
        "headline": headline,
        "start": start,
        "summary": summary,
        "comparisons": comparisons,
        "versus_start": versus_start,
        "runs": {obj: {str(s): {k: v for k, v in r.items() if not k.endswith("_series")} for s, r in runs.items()}
                 for obj, runs in per_run.items()},
        "tuning": choice,
    }

