"""``latentx study``: every objective × every seed from one warm start, compared with error bars.

Does steering exploration by hidden-state dynamics (ReLaX's DSD, VERL's effective rank) beat token-level
exploration (entropy bonus, KL-Cov, Clip-Cov) and plain GRPO?  A study answers with numbers that say how
sure they are:

1. **Prepare** (main process): warm-start the policy once (cached, so no two workers race to write it)
   and evaluate the starting policy once on the held-out instances.
2. **Tune** (optional, ``--tune relax.alpha=0.05,0.1,0.2``): each tuned objective runs its grid on the
   *validation* seeds (disjoint from the study seeds) with the same number of runs per objective, and
   is evaluated on validation instances (``eval.seed + 1`` unless ``validation_overrides`` say
   otherwise).  The value with the best ``tune_metric`` (mean over validation seeds; ties: the earlier
   grid value) is used in the study.
3. **Run**: every objective × study seed, in parallel processes (spawn; one torch thread each when
   there are several workers).  A run directory with ``summary.json`` and ``study_eval.json`` is done
   and skipped; one with checkpoints resumes where it stopped.
4. **Evaluate**: each finished run is evaluated once on the held-out instances by ``Trainer.evaluate``
   (Mean@1 greedy, ``eval.n`` samples at ``eval.temperature``) whose per-problem correct counts give the
   Pass@k curve for every k = 1..n (``study_eval.json``).  The study calls it itself rather than through
   ``Trainer.run`` (``eval.enabled`` is false in study runs), because ``run`` would also re-evaluate the
   shared starting policy in every run; the study evaluates that once.
5. **Report**: per objective, mean and t confidence interval over seeds of the final metrics, the Pass@k
   curve and the training signals (token entropy, DSD, ER); differences against the baseline paired
   by seed (paired t-test, Wilcoxon signed-rank, Holm-adjusted); plots and ``report.md``.

Layout of ``--out``::

    study.yaml                  the base train config and study settings of the last invocation
    start/eval.json             the starting policy (after the warm start) on the held-out instances
    tune/<objective>/<key>=<value>/s<seed>/   tuning runs;  tune/choice.json
    runs/<objective>/s<seed>/   study runs (config.yaml, metrics.jsonl, summary.json, study_eval.json)
    results.json  report.md  plots/*.png  invocations.jsonl (wall time and runs of each invocation)
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import math
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
import yaml

from latentx.config import ConfigError, atomic_write_text, from_dict, load_yaml_data, merge_overrides, to_dict

if TYPE_CHECKING:  # the heavy modules (torch) load only when a study runs
    from latentx.trainer import TrainConfig

__all__ = ["StudyConfig", "StudyError", "load_study_config", "run_study", "evaluate_policy", "evaluate_run",
           "study_command"]

EVAL_FILE = "study_eval.json"
PRESETS = ("cpu", "gpu-math")
#: training signals reported and plotted: (metrics.jsonl key, label)
SIGNALS = (("reward_mean", "training reward"), ("entropy_mean", "token entropy"), ("dsd_mean", "DSD"),
           ("er_mean", "effective rank"))


class StudyError(RuntimeError):
    """A study that cannot run or finish as asked; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class StudyConfig:
    """The ``study:`` section of a study YAML (every other section is a :class:`TrainConfig` section).

    ``seeds``: a count N (seeds 0..N-1) or a list.  ``tune``: ``{"relax.alpha": [0.05, 0.1, 0.2]}``,
    keys ``<objective>.<field>``; every tuned objective must get the same number of values.
    ``validation_overrides``: ``section.field=value`` strings applied to tuning runs only (e.g. another
    eval file for a fixed benchmark, or a cheaper ``eval.n``).  ``workers`` 0: one per available core.
    """

    objectives: list[str] = field(default_factory=lambda: ["grpo", "relax", "verl"])
    seeds: int | list[int] = 3
    workers: int = 0
    baseline: str = "grpo"
    level: float = 0.95
    alpha: float = 0.05
    tune: dict[str, Any] = field(default_factory=dict)
    validation_seeds: list[int] = field(default_factory=lambda: [100, 101])
    tune_metric: str = "mean@1_greedy"
    validation_overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from latentx.trainer import OBJECTIVES

        if isinstance(self.seeds, int):
            if self.seeds < 1:
                raise ValueError(f"study.seeds must be a positive count or a list of seeds, got {self.seeds}")
            self.seeds = list(range(self.seeds))
        self.seeds = [int(s) for s in self.seeds]
        from latentx.objectives import parse_objective_spec

        self.objectives = list(self.objectives)
        for label in self.objectives:  # a name, or name@preset (verl@enabled): a separate objective each
            if str(label).partition("@")[0] not in OBJECTIVES:
                raise ValueError(f"study.objectives: unknown objective {label!r} (known: {', '.join(OBJECTIVES)})")
            try:
                parse_objective_spec(label)
            except ValueError as err:
                raise ValueError(f"study.objectives: {err}") from None
        for label, items in (("objectives", self.objectives), ("seeds", self.seeds),
                             ("validation_seeds", self.validation_seeds)):
            if len(set(items)) != len(items):
                raise ValueError(f"study.{label} has duplicates: {items}")
        if not self.objectives or not self.seeds:
            raise ValueError("a study needs at least one objective and one seed")
        if self.workers < 0:
            raise ValueError(f"study.workers must be >= 0 (0 = one per core), got {self.workers}")
        if not 0 < self.level < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"study.level and study.alpha must lie in (0, 1), got {self.level}, {self.alpha}")
        self.tune = {str(k): _grid_values(k, v) for k, v in self.tune.items()}
        sizes: dict[int, list[str]] = {}
        for key in self.tune:
            section = key.split(".", 1)[0]
            method = section.partition("@")[0]  # verl@enabled.coef tunes verl.coef of that objective
            if "." not in key or method not in OBJECTIVES or OBJECTIVES[method].config_class is None:
                raise ValueError(
                    f"study.tune: {key!r} must be <objective>.<field> for a non-GRPO objective "
                    f"(grpo.* settings are shared by every objective, so tuning them is not per objective)"
                )
            if section not in self.objectives:
                raise ValueError(f"study.tune: {key!r} tunes {section}, which is not among the study's objectives")
            sizes.setdefault(len(self.tune[key]), []).append(key)
        tuned = [key.split(".", 1)[0] for key in self.tune]
        if len(set(tuned)) != len(tuned):
            raise ValueError(f"study.tune: tune one main coefficient per objective, got {sorted(self.tune)}")
        if len(sizes) > 1:
            raise ValueError(
                "study.tune: every tuned objective must get the same budget (number of grid values); got "
                + "; ".join(f"{n} for {', '.join(keys)}" for n, keys in sorted(sizes.items()))
            )
        if self.tune:
            if not self.validation_seeds:
                raise ValueError("study.validation_seeds must not be empty when tuning")
            overlap = sorted(set(self.validation_seeds) & set(self.seeds))
            if overlap:
                raise ValueError(f"study.validation_seeds must be disjoint from the study seeds; both have {overlap}")
        if self.baseline not in self.objectives:
            raise ValueError(f"study.baseline {self.baseline!r} must be one of the study's objectives {self.objectives}")

    @property
    def tuned_objectives(self) -> dict[str, str]:
        """objective -> its tuned key."""
        return {key.split(".", 1)[0]: key for key in self.tune}


def _grid_values(key: str, values: Any) -> list[Any]:
    if isinstance(values, str):
        values = [yaml.safe_load(v.strip()) for v in values.split(",") if v.strip()]
    if not isinstance(values, (list, tuple)):
        values = [values]
    if not values:
        raise ValueError(f"study.tune: {key!r} has no values")
    if len(set(map(repr, values))) != len(values):
        raise ValueError(f"study.tune: {key!r} has duplicate values {list(values)}")
    return list(values)


def preset_path(name: str) -> Path:
    """``configs/study-<name>.yaml`` of the current directory or of the latentx checkout."""
    if name not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / "configs" / f"study-{name}.yaml"
        if path.is_file():
            return path
    raise ConfigError(
        f"preset {name!r}: configs/study-{name}.yaml not found here or in the latentx checkout; "
        "pass the file with --config"
    )


def load_study_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> tuple["TrainConfig", StudyConfig]:
    """The base train config and the study settings from a study YAML (or the defaults) plus
    ``section.field=value`` overrides (``study.*`` ones go to the study section)."""
    from latentx.trainer import TrainConfig

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = load_yaml_data(path)  # the study YAML is a train config plus a `study:` section
    data = merge_overrides(data, overrides)
    study_data = data.pop("study", None) or {}
    where = f"{path}: " if path is not None else ""
    try:
        study = from_dict(StudyConfig, study_data, prefix="study")
        base = from_dict(TrainConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    return base, study


# ------------------------------------------------------------------------------------------------
# Evaluation with per-problem counts
# ------------------------------------------------------------------------------------------------


def _study_record(evaluation: dict[str, Any], seed: int, start: float) -> dict[str, Any]:
    from latentx.evaluate import headline_metrics

    try:
        result = headline_metrics(evaluation)
    except (ValueError, KeyError) as err:
        raise StudyError(f"the evaluation has no per-problem correct_counts ({err}); the study needs them for Pass@k") from None
    result.update(seed=seed, time_s=time.perf_counter() - start)
    return result


def evaluate_policy(trainer) -> dict[str, Any]:
    """``Trainer.evaluate`` of the trainer's current policy as the study's flat record (held-out Mean@1
    greedy, Mean@n, Pass@k and the per-problem ``correct_counts``), with the eval seed and the time it took."""
    start = time.perf_counter()
    return _study_record(trainer.evaluate(), trainer.cfg.eval.seed, start)


def evaluate_run(cfg: "TrainConfig") -> dict[str, Any]:
    """The study record of a finished run: its latest checkpoint, loaded, through the one evaluator
    (:func:`latentx.evaluate.held_out_evaluation`, as ``Trainer.evaluate``) — no trainer, optimizer,
    reference model or training pool is built."""
    from latentx.checkpoint import latest_checkpoint
    from latentx.evaluate import held_out_evaluation
    from latentx.models import load_model
    from latentx.tasks import build_task
    from latentx.trainer import _device

    checkpoint = latest_checkpoint(cfg.run_dir)
    if checkpoint is None:
        raise StudyError(f"{cfg.run_dir}: no complete checkpoint to evaluate; delete summary.json to train it again")
    start = time.perf_counter()
    model, tokenizer = load_model(str(checkpoint), device=str(_device(cfg.model.device)), dtype=cfg.model.dtype)
    ec, rc = cfg.eval, cfg.rollout
    evaluation = held_out_evaluation(model, tokenizer, build_task(cfg.task), ec.instances, ec.n, ec.ks,
                                     ec.temperature, ec.seed, rc.max_new_tokens, top_p=rc.top_p,
                                     batch_size=rc.generation_batch_size)
    return _study_record(evaluation, ec.seed, start)


def check_metric(name: str, n: int) -> None:
    """Raise :class:`StudyError` unless ``name`` is a metric an evaluation with ``n`` samples reports."""
    known = f"mean@1_greedy, mean@{n}, pass@<k> for k in 1..{n}, distinct_correct_per_problem"
    if name in ("mean@1_greedy", f"mean@{n}", "distinct_correct_per_problem"):
        return
    k = name[len("pass@"):] if name.startswith("pass@") else ""
    if not (k.isdigit() and 1 <= int(k) <= n):
        raise StudyError(f"metric {name!r} is not reported by an evaluation with {n} samples; known: {known}")


def metric_value(ev: dict[str, Any], name: str) -> float:
    """``mean@1_greedy``, ``mean@<n>``, ``pass@<k>`` (any k ≤ n, from the counts) or
    ``distinct_correct_per_problem`` of an evaluation."""
    from latentx.stats import pass_at_k_curve

    check_metric(name, ev["n"])
    if name.startswith("pass@"):
        return float(pass_at_k_curve(ev["correct_counts"], ev["n"], [int(name[len("pass@"):])])[0])
    return float(ev[name])


# ------------------------------------------------------------------------------------------------
# Running the jobs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One training run (resolved config) to bring to ``summary.json`` + ``study_eval.json``."""

    label: str
    cfg: Any  # TrainConfig, resolved

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def done(self) -> bool:
        return (self.run_dir / "summary.json").is_file() and (self.run_dir / EVAL_FILE).is_file()

    def steps_done(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        if self.done():
            return self.cfg.steps
        try:
            return min(self.cfg.steps, sum(1 for line in path.read_text().splitlines() if line.strip()))
        except OSError:
            return 0


def _init_worker(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def _execute(job: Job) -> dict[str, Any]:
    """Train (or resume) one run, then evaluate it; errors are returned with the traceback in error.log."""
    from latentx.trainer import Trainer

    run_dir = job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train.log"

    def log(message: str) -> None:
        with open(log_path, "a") as fh:
            fh.write(message + "\n")

    start = time.perf_counter()
    try:
        trainer = None
        if not (run_dir / "summary.json").is_file():
            trainer = Trainer(job.cfg, progress=False, log=log)
            trainer.run()
        if not (run_dir / EVAL_FILE).is_file():
            # just trained: its policy is in memory; trained earlier: the latest checkpoint is the final policy
            result = evaluate_policy(trainer) if trainer is not None else evaluate_run(job.cfg)
            atomic_write_text(run_dir / EVAL_FILE, json.dumps(result, indent=1))
    except Exception:  # noqa: BLE001 - one failed run must not take the others down
        text = traceback.format_exc()
        atomic_write_text(run_dir / "error.log", text)
        return {"label": job.label, "error": text.strip().splitlines()[-1], "log": str(run_dir / "error.log")}
    return {"label": job.label, "error": None, "seconds": time.perf_counter() - start}


def _check_same_config(job: Job) -> None:
    """Refuse to resume a run directory that was made with different settings (its location aside)."""
    path = job.run_dir / "config.yaml"
    if not path.is_file():
        return
    old, new = yaml.safe_load(path.read_text()) or {}, to_dict(job.cfg)
    old.pop("out", None), new.pop("out", None)  # a study directory may be moved or renamed
    if old != new:
        field_name = _first_difference(old, new)
        raise StudyError(
            f"{job.run_dir} was made with a different config ({field_name}); "
            "use another --out or delete that run directory"
        )


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
    return f"{prefix or 'config'}: {old!r} then, {new!r} now"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def run_jobs(jobs: list[Job], workers: int, title: str, progress: bool = True) -> list[dict[str, Any]]:
    """Bring every job to done: skipped when done, else run in ``workers`` spawned processes (in this
    process when 1).  Returns one outcome per job that ran; raises :class:`StudyError` if any failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    for job in jobs:
        _check_same_config(job)
    pending = [job for job in jobs if not job.done()]
    outcomes: list[dict[str, Any]] = []
    if not pending:
        return outcomes
    workers = max(1, min(workers or available_cores(), len(pending)))
    total = sum(job.cfg.steps + 1 for job in jobs)  # +1: the evaluation

    def completed() -> int:
        return sum(job.steps_done() + int(job.done()) for job in jobs)

    columns = [TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(title, total=total, completed=completed(), info="")
        info = lambda: f"runs {sum(j.done() for j in jobs)}/{len(jobs)}, {workers} worker(s)"  # noqa: E731
        bar.update(task, info=info())
        if workers == 1:
            for job in pending:
                outcomes.append(_execute(job))
                bar.update(task, completed=completed(), info=info())
        else:
            context = multiprocessing.get_context("spawn")
            with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                             initargs=(1,)) as pool:
                running = {pool.submit(_execute, job): job for job in pending}
                try:
                    while running:
                        finished, _ = futures.wait(running, timeout=2.0, return_when=futures.FIRST_COMPLETED)
                        for future in finished:
                            job = running.pop(future)
                            try:
                                outcomes.append(future.result())
                            except Exception as err:  # noqa: BLE001 - a worker died (e.g. killed for memory)
                                outcomes.append({"label": job.label, "error": f"worker died: {err!r}", "log": ""})
                        bar.update(task, completed=completed(), info=info())
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    failed = [o for o in outcomes if o["error"]]
    if failed:
        lines = "\n".join(f"  {o['label']}: {o['error']} ({o['log']})" for o in failed)
        raise StudyError(f"{len(failed)} of {len(pending)} runs failed; finished runs are kept, rerun to resume:\n{lines}")
    return outcomes


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------


def _run_config(base: "TrainConfig", objective: str, seed: int, out: Path, extra: list[str] = ()) -> "TrainConfig":
    from latentx.config import apply_overrides
    from latentx.trainer import resolve_config

    from latentx.objectives import parse_objective_spec

    name, preset = parse_objective_spec(objective)  # "verl@enabled" -> verl with verl.preset=enabled
    extra = [f"{name}.{item.split('.', 1)[1]}" if item.startswith(f"{objective}.") else item for item in extra]
    cfg = apply_overrides(base, [f"objective={name}", *preset, f"seed={seed}", f"out={out}", *extra])
    cfg.eval = replace(cfg.eval, enabled=False)  # the study evaluates each run itself (see the module doc)
    return resolve_config(cfg)


def prepare(base: "TrainConfig", out: Path, progress: bool = True) -> dict[str, Any]:
    """Warm-start once (cached for every worker) and evaluate the starting policy once (again only
    when the settings that decide it change)."""
    from latentx.trainer import Trainer

    path = out / "start" / "eval.json"
    cfg = _run_config(base, "grpo", base.seed, out / "start")
    identity = {k: v for k, v in to_dict(cfg).items() if k in ("model", "task", "warm_start", "rollout", "eval")}
    trainer = Trainer(cfg, progress=progress, log=lambda message: None)  # loads + warm-starts (cached)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("identity") == identity:
            return stored
    result = evaluate_policy(trainer)
    result["warm_start"] = {k: v for k, v in trainer.warm_info.items() if k in ("key", "steps", "final_loss", "cache_path")}
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
    for objective, key in study.tuned_objectives.items():
        for value in study.tune[key]:
            for seed in study.validation_seeds:
                run_dir = out / "tune" / objective / _tune_value_dir(key, value) / f"s{seed}"
                cfg = _run_config(base, objective, seed, run_dir, [*extra, f"{key}={value}"])
                jobs.append((objective, value, seed, Job(f"tune {objective} {key}={value} s{seed}", cfg)))
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
    for objective, key in study.tuned_objectives.items():
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
    for objective in study.objectives:
        extra = []
        if choice and objective in choice["objectives"]:
            chosen = choice["objectives"][objective]
            extra.append(f"{chosen['key']}={chosen['value']}")
        for seed in study.seeds:
            cfg = _run_config(base, objective, seed, out / "runs" / objective / f"s{seed}", extra)
            jobs[objective, seed] = Job(f"{objective} s{seed}", cfg)
    outcomes = run_jobs(list(jobs.values()), study.workers, "study", progress)
    phases["runs"] = time.perf_counter() - started - phases["prepare"] - phases["tuning"]
    results = aggregate(base, study, jobs, start_eval, choice)
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


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------


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


def _smooth(values: list[float], width: int) -> list[float]:
    out, window = [], []
    for v in values:
        window.append(v)
        if len(window) > width:
            window.pop(0)
        out.append(sum(window) / len(window))
    return out


def aggregate(base: "TrainConfig", study: StudyConfig, jobs: dict[tuple[str, int], Job],
              start_eval: dict[str, Any], choice: dict[str, Any] | None) -> dict[str, Any]:
    """Everything the report states, as plain JSON-able numbers."""
    import numpy as np

    from latentx.stats import holm, paired_test, pass_at_k_curve
    from latentx.trainer import read_metrics

    n, level = base.eval.n, study.level
    headline = headline_metrics(n)
    per_run: dict[str, dict[int, dict[str, Any]]] = {}
    for (objective, seed), job in jobs.items():
        ev = json.loads((job.run_dir / EVAL_FILE).read_text())
        rows = read_metrics(job.run_dir)
        record = {key: metric_value(ev, key) for key, _ in headline}
        record["pass_curve"] = pass_at_k_curve(ev["correct_counts"], ev["n"]).tolist()
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
        per_run.setdefault(objective, {})[seed] = record

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
                series = np.array([_smooth(runs[s][f"{key}_series"][:length], width) for s in seeds])
                band = [_interval_dict(col.tolist(), level) for col in series.T]
                entry[f"{key}_trajectory"] = {k: [b[k] for b in band] for k in ("mean", "low", "high")}
        entry["signal_steps"] = _interval_dict([runs[s]["signal_steps"] for s in seeds], level)
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
            comparisons.append({
                "objective": objective, "metric": key, "label": label, "n": test.n, "headline": not key.endswith("_final"),
                "diff": test.diff.mean, "low": test.diff.low, "high": test.diff.high, "t_stat": test.t_stat,
                "t_p": test.t_p, "wilcoxon_p": test.wilcoxon_p, "wilcoxon_min_p": test.wilcoxon_min_p,
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


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def _color(objective: str) -> str:
    from latentx.trainer import OBJECTIVES

    names = list(OBJECTIVES)
    if objective not in names:  # name@preset: colours after the built-in ones, in order of first use
        if objective not in _VARIANT_COLORS:
            _VARIANT_COLORS.append(objective)
        return f"C{(len(names) - 1 + _VARIANT_COLORS.index(objective)) % 10}"
    return "0.25" if names.index(objective) == 0 else f"C{names.index(objective) - 1}"  # the first (GRPO) in grey


_VARIANT_COLORS: list[str] = []


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Pass@k curves, training signals, final metrics (and the tuning grid): PNG files by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    summary, settings = results["summary"], results["settings"]
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
        ax.plot(ks, curve["mean"], color=_color(objective), lw=1.8, label=objective)
        if len(entry["seeds"]) > 1:
            ax.fill_between(ks, curve["low"], curve["high"], color=_color(objective), alpha=0.15)
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
                ax.plot(steps, band["mean"], color=_color(objective), lw=1.6, label=objective)
                if len(entry["seeds"]) > 1:
                    ax.fill_between(steps, band["low"], band["high"], color=_color(objective), alpha=0.15)
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
            ax.bar(xs, means, width, yerr=errors, capsize=3, color=_color(objective), label=objective)
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
            ax.plot(range(len(labels)), [e["mean"] for e in entry["grid"]], "o-", color=_color(objective), label="mean")
            for i, e in enumerate(entry["grid"]):
                ax.plot([i] * len(e["scores"]), list(e["scores"].values()), "x", color="0.4", ms=5)
            chosen = labels.index(str(entry["value"]))
            ax.axvline(chosen, color="0.6", ls=":", lw=1)
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel(entry["key"])
            ax.set_title(f"{objective}: validation {tuning['metric']}", fontsize=9)
            ax.grid(alpha=0.3)
        save(fig, "tuning.png")
    return written


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


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


def _verdicts(comparisons: list[dict[str, Any]], baseline: str, alpha: float) -> list[str]:
    """One bullet per objective: the direction of each final-metric difference and whether it is significant."""
    bullets = []
    for objective in dict.fromkeys(c["objective"] for c in comparisons if c["headline"]):
        rows = [c for c in comparisons if c["headline"] and c["objective"] == objective]
        parts = []
        for c in rows:
            shown = round(c["diff"], 3)
            word = "higher" if shown > 0 else "lower" if shown < 0 else "equal"
            verdict = (f"significant, p = {_fmt_p(c['t_p'])}" + ("" if c["significant_holm"] else ", not after Holm")
                       if c["significant"] else "not significant")
            parts.append(f"{c['label']} {word} ({_fmt_signed(c['diff'])}, {verdict})")
        wins = [c for c in rows if c["significant"] and c["diff"] > 0]
        losses = [c for c in rows if c["significant"] and c["diff"] < 0]
        headline = ("significantly better on " + ", ".join(c["label"] for c in wins) if wins and not losses
                    else "significantly worse on " + ", ".join(c["label"] for c in losses) if losses and not wins
                    else "mixed: significantly better on some metrics and worse on others" if wins
                    else f"no significant difference from {baseline} at p < {alpha}")
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
            verdict = ("yes" + ("" if c["significant_holm"] else " (not after Holm)")) if c["significant"] else "no"
            lines.append(f"| {c['objective']} | {c['label']} | {_fmt_signed(c['diff'])}{ci} | {_fmt_p(c['t_p'])} | "
                         f"{_fmt_p(c['wilcoxon_p'])} | {_fmt_p(c.get('holm_p', math.nan))} | {verdict} |")
        lines += ["", "**In words.**", ""] + _verdicts(comparisons, baseline, s["alpha"])
        lines += ["", f"**Power.** With {n_pairs} paired seeds the paired t-test has {n_pairs - 1} "
                  f"degree{'s' if n_pairs != 2 else ''} of freedom and the exact Wilcoxon test cannot give p below {2 / 2 ** n_pairs:.3g}"
                  + (", so it can never reach significance here" if 2 / 2 ** n_pairs >= s["alpha"] else "")
                  + ". These tests have low power: a non-significant difference is not evidence that the "
                  "objectives are equal, only that this study cannot tell them apart."]

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
                "final_metrics.png": "Final metrics", "tuning.png": "Tuning grid"}
    for name in plots:
        lines += [f"![{captions.get(name, name)}](plots/{name})", ""]
    train_time = sum(r["train_time_s"] for runs in results["runs"].values() for r in runs.values())
    lines += ["## Cost", "",
              f"Training time summed over runs: {train_time / 60:.1f} min (per-step timings from `metrics.jsonl`); "
              f"{len(s['objectives'])} objectives × {len(seeds)} seeds.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _parse_seeds(text: str, option: str) -> str:
    """``"5"`` -> ``"5"`` (a count), ``"0,1,2"`` -> ``"[0, 1, 2]"`` (a list), as YAML for an override."""
    try:
        items = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be a count (5) or a comma list of integers (0,1,2); got {text!r}") from None
    if not items:
        raise ConfigError(f"{option} is empty")
    return str(items[0]) if "," not in text else str(items)


def study_command(
    objectives: Optional[str] = typer.Option(None, help="comma list, e.g. grpo,relax,verl,entropy_bonus,kl_cov"),
    seeds: Optional[str] = typer.Option(None, help="a count N (seeds 0..N-1) or a comma list of seeds"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="study YAML: train sections + a study: section"),
    preset: Optional[str] = typer.Option(None, help="cpu | gpu-math (configs/study-<preset>.yaml)"),
    workers: Optional[int] = typer.Option(None, help="parallel runs (default: one per available core)"),
    set_: list[str] = typer.Option([], "--set", help="override a field: --set steps=20, --set study.alpha=0.1"),
    tune: list[str] = typer.Option([], "--tune", help="grid for one objective's coefficient: relax.alpha=0.05,0.1,0.2"),
    validation_seeds: Optional[str] = typer.Option(None, help="seeds for tuning runs, disjoint from --seeds"),
    no_tune: bool = typer.Option(False, "--no-tune", help="ignore the config's tuning grid"),
    out: Path = typer.Option(Path("study"), help="study directory (reruns resume it)"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Every objective × every seed from one warm start; mean ± 95 % CI, paired tests against GRPO, plots."""
    try:
        if config is not None and preset is not None:
            raise ConfigError("give --config or --preset, not both")
        path = preset_path(preset) if preset is not None else config
        overrides = list(set_)
        if objectives is not None:
            overrides.append(f"study.objectives={objectives}")
        if seeds is not None:
            overrides.append(f"study.seeds={_parse_seeds(seeds, '--seeds')}")
        if workers is not None:
            overrides.append(f"study.workers={workers}")
        if validation_seeds is not None:
            parsed = _parse_seeds(validation_seeds, "--validation-seeds")
            overrides.append(f"study.validation_seeds={parsed if parsed.startswith('[') else f'[{parsed}]'}")
        base, study = load_study_config(path, overrides)
        grid = {} if no_tune else dict(study.tune)
        for text in tune:
            if "=" not in text:
                raise ConfigError(f"--tune {text!r} must look like relax.alpha=0.05,0.1,0.2")
            key, values = text.split("=", 1)
            grid[key.strip()] = values
        study = from_dict(StudyConfig, {**to_dict(study), "tune": grid}, prefix="study")
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if base.eval.n < 64:
        typer.secho(f"note: eval.n = {base.eval.n}: the Pass@k curve stops at k = {base.eval.n} (the presets use 64)",
                    fg=typer.colors.YELLOW, err=True)
    try:
        results = run_study(base, study, out, progress=not quiet)
    except StudyError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"study directory: {out}  (this invocation: {results['wall_time_s'] / 60:.1f} min)")
