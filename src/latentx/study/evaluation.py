"""Held-out evaluation of a study's policies with per-problem correct counts, and the metrics read from it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from latentx.study.config import StudyError

if TYPE_CHECKING:
    from latentx.trainer import TrainConfig




def evaluate_policy(trainer) -> dict[str, Any]:
    """``Trainer.evaluate`` of the trainer's current policy as the study's flat record (held-out Mean@1
    greedy, Mean@n, Pass@k and the per-problem ``correct_counts``), with the eval seed and the time it took."""
    return _record(trainer.evaluate, trainer.cfg.eval.seed)


def evaluate_run(cfg: "TrainConfig") -> dict[str, Any]:
    """The study's record of a finished run: its latest checkpoint is loaded (no :class:`Trainer`, no
    optimizer or reference model) and evaluated by the one evaluator, with the run's own settings."""
    from latentx.checkpoint import latest_checkpoint
    from latentx.models import load_model
    from latentx.tasks import build_task
    from latentx.trainer import _device, evaluate_held_out

    checkpoint = latest_checkpoint(cfg.run_dir)
    if checkpoint is None:
        raise StudyError(f"{cfg.run_dir} has no checkpoint to evaluate")
    model, tokenizer = load_model(str(checkpoint), device=str(_device(cfg.model.device)), dtype=cfg.model.dtype)
    task = build_task(cfg.task)
    return _record(lambda: evaluate_held_out(model, tokenizer, task, cfg), cfg.eval.seed)


def _record(evaluate, seed: int) -> dict[str, Any]:
    from latentx.evaluate import headline_metrics

    start = time.perf_counter()
    try:
        result = headline_metrics(evaluate())
    except (ValueError, KeyError) as err:
        raise StudyError(f"the evaluation has no per-problem correct_counts ({err}); the study needs them for Pass@k") from None
    result.update(seed=seed, time_s=time.perf_counter() - start)
    return result


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

