"""Running a study's training jobs: one process per core, resumable, one failure never takes the rest down."""

from __future__ import annotations

import concurrent.futures as futures
import json
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentx.checkpoint import run_differences
from latentx.config import atomic_write_text, to_dict
from latentx.study.config import EVAL_FILE, StudyError
from latentx.study.evaluation import evaluate_policy, evaluate_run




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
            # trained earlier: the latest checkpoint is the final policy, evaluated without a Trainer
            result = evaluate_policy(trainer) if trainer is not None else evaluate_run(job.cfg)
            atomic_write_text(run_dir / EVAL_FILE, json.dumps(result, indent=1))
    except Exception:  # noqa: BLE001 - one failed run must not take the others down
        text = traceback.format_exc()
        atomic_write_text(run_dir / "error.log", text)
        return {"label": job.label, "error": text.strip().splitlines()[-1], "log": str(run_dir / "error.log")}
    return {"label": job.label, "error": None, "seconds": time.perf_counter() - start}


def _check_same_config(job: Job) -> None:
    """Refuse to resume a run directory that was made with different settings (its location aside: a study
    directory may be moved or renamed, so only ``out`` may differ)."""
    shown = run_differences(job.run_dir, to_dict(job.cfg), allowed=("out",))
    if shown is not None:
        raise StudyError(
            f"{job.run_dir} was made with a different config ({shown}); use another --out or delete that run directory"
        )


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

