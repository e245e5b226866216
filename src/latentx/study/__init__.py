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
4. **Evaluate**: each finished run is evaluated once on the held-out instances by the one evaluator
   (``latentx.trainer.evaluate_held_out``; a run trained earlier is loaded from its checkpoint, no Trainer)
   (Mean@1 greedy, ``eval.n`` samples at ``eval.temperature``) whose per-problem correct counts give the
   Pass@k curve for every k = 1..n (``study_eval.json``).  The study calls it itself rather than through
   ``Trainer.run`` (``eval.enabled`` is false in study runs), because ``run`` would also re-evaluate the
   shared starting policy in every run; the study evaluates that once.
5. **Report**: per objective, mean and t confidence interval over seeds of the final metrics, the Pass@k
   curve and the training signals (token entropy, DSD, ER); differences against the baseline paired
   by seed (paired t-test, Wilcoxon signed-rank, Holm-adjusted) with a power verdict for each: "difference
   found", "no difference larger than X" (X the minimum detectable difference at 80 % power, when it is at
   most ``study.target_difference``) or "cannot tell (underpowered)"; plots and ``report.md``.

Modules: ``config`` (settings, presets, objective variants ``relax@authors`` / ``study.variants``),
``evaluation``, ``jobs`` (process pool), ``runner`` (prepare / tune / run), ``aggregate`` (pure, from
per-run records), ``plots``, ``report``, ``command``; the statistics are :mod:`latentx.stats`.

Layout of ``--out``::

    study.yaml                  the base train config and study settings of the last invocation
    start/eval.json             the starting policy (after the warm start) on the held-out instances
    tune/<objective>/<key>=<value>/s<seed>/   tuning runs;  tune/choice.json
    runs/<objective>/s<seed>/   study runs (config.yaml, metrics.jsonl, summary.json, study_eval.json)
    results.json  report.md  plots/*.png  invocations.jsonl (wall time and runs of each invocation)
"""

from latentx.study.aggregate import aggregate, load_records, run_record
from latentx.study.config import EVAL_FILE, PRESETS, SIGNALS, StudyConfig, StudyError, load_study_config, objective_of, preset_path
from latentx.study.evaluation import check_metric, evaluate_policy, evaluate_run, metric_value
from latentx.study.jobs import Job, run_jobs
from latentx.study.runner import prepare, run_study, tune
from latentx.study.command import study_command

__all__ = [
    "EVAL_FILE", "PRESETS", "SIGNALS", "Job", "StudyConfig", "StudyError", "aggregate", "check_metric",
    "evaluate_policy", "evaluate_run", "load_records", "load_study_config", "metric_value", "objective_of",
    "prepare", "preset_path", "run_jobs", "run_record", "run_study", "study_command", "tune",
]
