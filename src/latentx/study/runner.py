"""The study itself: prepare the starting policy, tune on validation seeds, run every objective × seed,
aggregate, plot, report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from latentx.config import atomic_write_text, to_dict
from latentx.study.aggregate import aggregate, load_records
from latentx.study.config import EVAL_FILE, StudyConfig, objective_of
from latentx.study.evaluation import _record, check_metric, metric_value
from latentx.study.jobs import Job, available_cores, run_jobs
from latentx.study.plots import write_plots
from latentx.study.report import write_report

if TYPE_CHECKING:
    from latentx.trainer import TrainConfig



def _run_config(base: "TrainConfig", objective: str, seed: int, out: Path, extra: list[str] = ()) -> "TrainConfig":
    from latentx.config import apply_overrides
    from latentx.trainer import resolve_config

    cfg = apply_overrides(base, [f"objective={objective}", f"seed={seed}", f"out={out}", *extra])
    cfg.eval = replace(cfg.eval, enabled=False)  # the study evaluates each run itself (see the module doc)
    return resolve_config(cfg)


def prepare(base: "TrainConfig", out: Path, progress: bool = True) -> dict[str, Any]:
    """Warm-start once (cached for every worker) and evaluate the starting policy once (again only
    when the settings that decide it change).  No :class:`Trainer` is built: the policy is loaded and
    warm-started by :func:`latentx.trainer.initial_policy` and evaluated by the one evaluator."""
    from latentx.tasks import build_task
    from latentx.trainer import evaluate_held_out, initial_policy

    path = out / "start" / "eval.json"
    cfg = _run_config(base, "grpo", base.seed, out / "start")
    identity = {k: v for k, v in to_dict(cfg).items() if k in ("model", "task", "warm_start", "rollout", "eval")}
    task = build_task(cfg.task)
    model, tokenizer, warm_info = initial_policy(cfg, task, progress=progress, log=lambda message: None)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("identity") == identity:
            return stored
    result = _record(lambda: evaluate_held_out(model, tokenizer, task, cfg), cfg.eval.seed)
    result["warm_start"] = {k: v for k, v in warm_info.items() if k in ("key", "steps", "final_loss", "cache_path")}
    result["identity"] = identity
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def _tune_value_dir(key: str, value: Any) -> str:
    return f"{key.split('.', 1)[1]}={value}"


def tune(base: "TrainConfig", study: StudyConfig, out: Path, progress: bool = True) -> tuple[dict[str, Any], int]:
    """Run each tuned objective's grid on the validation seeds and pick the best value per objective.
    Returns the choice and the number of tuning runs this call trained or evaluated."""
    extra = [f"eval.seed={base.eval.seed + 1}", *study.validation_overrides]
    jobs: list[tuple[str, Any, int, Job]] = []
    for label in study.objectives:
        key = study.tuned_key(label)
        if key is None:
            continue
        objective, variant = objective_of(label, study.variants)
        for value in study.tune[key]:
            for seed in study.validation_seeds:
                run_dir = out / "tune" / label / _tune_value_dir(key, value) / f"s{seed}"
                cfg = _run_config(base, objective, seed, run_dir, [*variant, *extra, study.tune_override(label, key, value)])
                jobs.append((label, value, seed, Job(f"tune {label} {key}={value} s{seed}", cfg)))
    check_metric(study.tune_metric, jobs[0][3].cfg.eval.n)  # before hours of runs, not after
    ran = len(run_jobs([job for *_, job in jobs], study.workers, "tuning", progress))
    grid: dict[str, list[dict[str, Any]]] = {}
    for objective, value, seed, job in jobs:
        ev = json.loads((job.run_dir / EVAL_FILE).read_text())
        entries = grid.setdefault(objective, [])
        entry = next((e for e in entries if e["value"] == value), None)
        if entry is None:
            entry = {"value": value, "scores": {}}
            entries.append(entry)
        entry["scores"][str(seed)] = metric_value(ev, study.tune_metric)
    choice: dict[str, Any] = {"metric": study.tune_metric, "validation_seeds": study.validation_seeds,
                              "validation_overrides": extra, "objectives": {}}
    for objective in grid:
        key = study.tuned_key(objective)
        entries = grid[objective]
        for entry in entries:
            entry["mean"] = sum(entry["scores"].values()) / len(entry["scores"])
        best = max(entries, key=lambda e: e["mean"])  # max keeps the first of equal means: the earlier value
        choice["objectives"][objective] = {"key": key, "value": best["value"], "grid": entries,
                                           "runs": len(entries) * len(study.validation_seeds)}
    atomic_write_text(out / "tune" / "choice.json", json.dumps(choice, indent=1, default=str))
    return choice, ran


def run_study(base: "TrainConfig", study: StudyConfig, out: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Prepare, tune (if asked), run every objective × seed, aggregate, plot and write ``report.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    atomic_write_text(out / "study.yaml", yaml.safe_dump({**to_dict(base), "study": to_dict(study)}, sort_keys=False))
    start_eval = prepare(base, out, progress)
    phases = {"prepare": time.perf_counter() - started}
    choice, tuning_runs = tune(base, study, out, progress) if study.tune else (None, 0)
    phases["tuning"] = time.perf_counter() - started - phases["prepare"]
    jobs: dict[tuple[str, int], Job] = {}
    for label in study.objectives:
        objective, extra = objective_of(label, study.variants)
        if choice and label in choice["objectives"]:
            chosen = choice["objectives"][label]
            extra = [*extra, study.tune_override(label, chosen["key"], chosen["value"])]
        for seed in study.seeds:
            cfg = _run_config(base, objective, seed, out / "runs" / label / f"s{seed}", extra)
            jobs[label, seed] = Job(f"{label} s{seed}", cfg)
    outcomes = run_jobs(list(jobs.values()), study.workers, "study", progress)
    phases["runs"] = time.perf_counter() - started - phases["prepare"] - phases["tuning"]
    results = aggregate(base, study, load_records(jobs, base.eval.n), start_eval, choice)
    invocation = {"finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  "wall_time_s": time.perf_counter() - started, "phases_s": phases, "runs": len(outcomes),
                  "tuning_runs": tuning_runs, "workers": max(1, study.workers or available_cores())}
    with open(out / "invocations.jsonl", "a") as fh:
        fh.write(json.dumps(invocation) + "\n")
    results["invocations"] = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines() if line]
    results["wall_time_s"] = invocation["wall_time_s"]
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    plots = write_plots(results, out / "plots")
    write_report(results, out, plots)
    return results

