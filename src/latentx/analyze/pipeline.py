"""``latentx analyze``: sample responses from one or more models and tabulate / plot their latent dynamics.

Pipeline (per model, in order; definitions in METHODS.md §0-§2 and :mod:`latentx.analyze.signals`):

1. the same ``prompts`` problems for every model (``task.eval_instances(prompts, seed)``), R = ``samples``
   responses each, sampled at ``temperature`` / ``top_p`` with ``torch.manual_seed(seed)``;
2. one no-grad forward per chunk with hidden states -> per-response ER / ERV / ERA, entropy, confidence;
3. the Koopman dictionary: ``--dictionary`` (one for all models, or one per model), else the one saved
   with a ``latentx train`` checkpoint given as the model, else fitted on this model's trajectories;
   then DSD, eigenvalues and Residual-DMD residuals of every response;
4. tables (written after every model, so a later failure keeps the earlier results), statistics
   (:mod:`latentx.analyze.stats`), figures (:mod:`latentx.analyze.figures`), ``report.html``,
   ``summary.json``.

Output directory::

    responses.parquet / .csv     one row per response (columns: RESPONSE_COLUMNS)
    eigenvalues.parquet / .csv   one row per Koopman mode (model, response_id, mode, real, imag, modulus, residual, ...)
    correlations.csv             every pair of signals, Spearman and Pearson, Fisher-z intervals, n
    dispersion.csv               per model and prompt: cv_er, cv_dsd, spectral_w1 (needs R >= 2)
    prefix_er.csv                the prefix ER curves of the example responses
    figures/*.png                the report's figures
    report.html                  self-contained (figures embedded as base64 PNG)
    summary.json                 settings, key numbers per model, notes, failures, timings
"""

from __future__ import annotations

import gc
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentx.analyze.signals import ModelSignals, SignalSettings, compute_model_signals, signal_defaults
from latentx.analyze.stats import CorrelationMatrix, correlation_matrix, group_dispersion

__all__ = [
    "AnalyzeConfig",
    "Analysis",
    "AnalysisError",
    "RESPONSE_COLUMNS",
    "EIGEN_COLUMNS",
    "CORRELATION_SIGNALS",
    "FIGURES",
    "run_analysis",
    "build_instances",
]

RESPONSE_COLUMNS = (
    "model", "response_id", "prompt_index", "prompt_id", "sample_index", "length", "correct", "reward",
    "entropy", "confidence", "er", "erv", "era", "dsd", "spectral_radius", "median_residual", "windows",
    "matched_length", "er_matched", "dsd_matched", "text",
)
EIGEN_COLUMNS = ("model", "response_id", "prompt_index", "mode", "real", "imag", "modulus", "residual", "correct")
CORRELATION_SIGNALS = ("entropy", "confidence", "er", "erv", "era", "dsd", "length")
DISTRIBUTION_SIGNALS = ("dsd", "er", "erv", "era", "entropy", "length")
FIGURES = {
    "eigenvalues": "Koopman eigenvalues of every response in the complex plane (dashed: unit circle), coloured by "
                   "their Residual-DMD residual (Colbrook & Townsend 2024); modes with a high residual are spurious.",
    "distributions": "Distributions of DSD, ER, ERV, ERA, mean token entropy and length, split into correct and "
                     "incorrect responses (boxes: quartiles, whiskers: 1.5 IQR; n = responses with a defined value).",
    "correlations": "Correlation matrix of the per-response signals; each cell gives the coefficient and its "
                    "Fisher-z confidence interval, over the responses where both signals are defined.",
    "prefix_er": "Effective rank of growing prefixes of a few responses (grey), with the stride windows m_k whose "
                 "increments define ERV and ERA (METHODS.md §1).",
    "dispersion": "Per-input dispersion of the dynamics: for each prompt, the spread across its R responses of ER "
                  "and DSD (coefficient of variation) and of the Koopman spectra (mean pairwise 1-Wasserstein distance "
                  "between eigenvalue-modulus distributions), all computed on the first T_g tokens of each response "
                  "(T_g = the group's shortest response) so that length differences do not count as different "
                  "dynamics. Lower = responses to one input follow more similar dynamics; lines join the same prompt "
                  "across models.",
}


class AnalysisError(ValueError):
    """The analysis cannot run (bad option, unreadable problem file, no model could be analysed)."""


@dataclass
class AnalyzeConfig:
    """Options of ``latentx analyze`` (the CLI flags of the same names; ``None`` = derived default)."""

    models: list[str]
    out: str = "report"
    task: str = "countdown"
    data: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    prompts: int = 16
    samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    dictionaries: list[str] = field(default_factory=list)
    stride: int | None = None  # default: clamp(L // 8, 2, 40) as latentx train
    m: int | None = None  # default: clamp(L // 3, 4, 50) as latentx train
    window: int | None = 512
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 16
    fit_epochs: int = 1
    examples: int = 2
    method: Literal["spearman", "pearson"] = "spearman"
    ci_level: float = 0.95
    image_blind: bool = False  # also run every model on the same prompts with blank images (VLM control)

    def __post_init__(self) -> None:
        if not self.models:
            raise AnalysisError("give at least one --model")
        for name in ("prompts", "samples", "max_new_tokens", "batch_size", "fit_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnalysisError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("stride", "m"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise AnalysisError(f"--{name} must be a positive integer, got {value!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 2):
            raise AnalysisError(f"--window must be an integer >= 2, got {self.window!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise AnalysisError(f"--temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise AnalysisError(f"--top-p must lie in (0, 1], got {self.top_p!r}")
        if self.examples < 0:
            raise AnalysisError(f"--examples must be >= 0, got {self.examples!r}")
        if self.method not in ("spearman", "pearson"):
            raise AnalysisError(f"--method must be 'spearman' or 'pearson', got {self.method!r}")
        if not 0 < self.ci_level < 1:
            raise AnalysisError(f"ci_level must lie in (0, 1), got {self.ci_level!r}")
        if len(self.dictionaries) not in (0, 1, len(self.models)):
            raise AnalysisError(
                f"give --dictionary once (for every model) or once per --model ({len(self.models)}), "
                f"got {len(self.dictionaries)}"
            )


@dataclass
class Analysis:
    """What :func:`run_analysis` produced (the report and the terminal summary are rendered from it)."""

    config: AnalyzeConfig
    out_dir: Path
    settings: SignalSettings
    models: list[ModelSignals]
    summary: list[dict[str, Any]]
    correlations: dict[str, CorrelationMatrix]
    figures: dict[str, Path]
    figure_png: dict[str, bytes]
    files: dict[str, Path]
    notes: list[str]
    failures: list[str]
    timings: dict[str, float]


# ------------------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------------------


def _math_problems(path: str, prompts: int, seed: int, options: dict[str, Any]) -> tuple[Any, list, list[str]]:
    """Problems of a math file: every valid row is usable (no train / eval split), broken rows are skipped.

    Formatting and grading are :class:`latentx.tasks.MathTask`'s (chat template + boxed instruction, or
    its plain template; math-verify on the last ``\\boxed{}``).
    """
    from latentx.tasks import MathTask, TaskInstance
    from latentx.tasks.benchmarks import BenchmarkError, load_benchmark
    from latentx.tasks.math_task import BOXED_INSTRUCTION, PLAIN_TEMPLATE

    known = {"problem_key", "answer_key", "chat", "system_prompt", "plain_template", "grade_timeout"}
    unknown = set(options) - known
    if unknown:
        raise AnalysisError(f"--task-option {sorted(unknown)} not understood by the math task here; known: {sorted(known)}")
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            benchmark = load_benchmark(path, problem_key=options.get("problem_key"),
                                       answer_key=options.get("answer_key"), on_error="skip")
    except BenchmarkError as error:
        raise AnalysisError(f"--data {path}: {error}") from None
    notes += [f"--data {path}: {w.message}" for w in caught if "malformed" in str(w.message)]

    class _FileProblems(MathTask):  # MathTask's prompt format and grader over one file's problems
        def __init__(self, instances: list) -> None:
            self.chat = options.get("chat")
            self.system_prompt = options.get("system_prompt", BOXED_INSTRUCTION)
            self.plain_template = options.get("plain_template", PLAIN_TEMPLATE)
            self.grade_timeout = float(options.get("grade_timeout", 5.0))
            MathTask.validate_options(path=path, plain_template=self.plain_template, grade_timeout=self.grade_timeout)
            self.pools = {"train": [], "eval": instances}

    instances = [TaskInstance(f"{benchmark.name}/{p.id}", p.problem, str(p.answer), dict(p.meta or {}))
                 for p in benchmark.problems]
    task = _FileProblems(instances)
    chosen = task.eval_instances(prompts, seed)
    if len(chosen) < prompts:
        notes.append(f"--data {path} has {len(chosen)} valid problems; --prompts {prompts} asked for more")
    return task, chosen, notes


def build_instances(task: str, data: str | None, prompts: int, seed: int, options: dict[str, Any]) -> tuple[Any, list, list[str]]:
    """``(task, instances, notes)``: the same ``prompts`` problems for every model.

    ``math`` reads ``data`` (JSONL / JSON / Parquet or a known benchmark name; malformed rows are skipped
    and reported); other tasks draw ``task.eval_instances(prompts, seed)`` (held-out problems).
    """
    from latentx.tasks import get_task

    if task == "math":
        if not data:
            raise AnalysisError("--task math needs --data FILE (JSONL / JSON / Parquet of problems, or a benchmark name)")
        return _math_problems(data, prompts, seed, options)
    if data:
        raise AnalysisError(f"--data is read by --task math only; the {task} task generates its own problems")
    try:
        built = get_task(task, **options)
        return built, built.eval_instances(prompts, seed), []
    except ValueError as error:
        raise AnalysisError(f"--task {task}: {error}") from None


# ------------------------------------------------------------------------------------------------------
# models and dictionaries
# ------------------------------------------------------------------------------------------------------

_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_model_arg(arg: str) -> tuple[str, str]:
    """``"NAME=SPEC"`` -> (NAME, SPEC); a plain spec gets a label from its name (file stem, run@checkpoint)."""
    if "=" in arg and not Path(arg).exists():
        name, spec = arg.split("=", 1)
        if not _LABEL.match(name) or not spec:
            raise AnalysisError(f"--model {arg!r}: expected SPEC or NAME=SPEC with NAME of letters, digits, . _ + -")
        return name, spec
    path = Path(arg).expanduser()
    if arg.endswith(".gguf") or "::" in arg:
        return Path(arg.split("::")[-1]).stem, arg
    if path.is_dir():
        from latentx.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(path) if (path / "checkpoints").is_dir() else None
        if checkpoint is not None:
            return f"{path.resolve().name}@{checkpoint.name}", arg
        if path.name.startswith("step_") and path.parent.name == "checkpoints":
            return f"{path.resolve().parent.parent.name}@{path.name}", arg
        return path.resolve().name, arg
    return arg.rstrip("/").split("/")[-1], arg


def _dictionary_file(where: str) -> Path | None:
    """``koopman.safetensors`` of a file / checkpoint dir / run dir (None if the directory has none)."""
    path = Path(where).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    if (path / "koopman.safetensors").is_file():
        return path / "koopman.safetensors"
    if (path / "checkpoints").is_dir():
        from latentx.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(path)
        if checkpoint is not None and (checkpoint / "koopman.safetensors").is_file():
            return checkpoint / "koopman.safetensors"
    return None


def _given_dictionaries(cfg: AnalyzeConfig) -> list:
    """The ``--dictionary`` files, loaded before any model (a bad path fails at once, naming it)."""
    from latentx.dynamics import KoopmanDictionary

    loaded = []
    for given in cfg.dictionaries:
        found = _dictionary_file(given)
        if found is None:
            raise AnalysisError(f"--dictionary {given}: no such file, and no koopman.safetensors in that directory / run")
        try:
            loaded.append((KoopmanDictionary.load(found), f"--dictionary {found}"))
        except Exception as error:  # noqa: BLE001 - any unreadable file: name it
            raise AnalysisError(f"--dictionary {found}: cannot be loaded as a Koopman dictionary ({error})") from None
    return loaded


def _model_dictionary(given: list, index: int, spec: str):
    """``(dictionary or None, source text)`` for model ``index``: ``--dictionary`` first, then its run's."""
    from latentx.dynamics import KoopmanDictionary

    if given:
        return given[0] if len(given) == 1 else given[index]
    found = _dictionary_file(spec) if Path(spec).expanduser().is_dir() else None
    if found is not None:
        return KoopmanDictionary.load(found), f"saved with the run ({found})"
    return None, ""


# ------------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------------


def _write_table(columns: dict[str, list], stem: Path) -> list[Path]:
    """``stem.parquet`` and ``stem.csv`` from equal-length columns."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict(columns)
    pq.write_table(table, stem.with_suffix(".parquet"))
    pacsv.write_csv(table, stem.with_suffix(".csv"))
    return [stem.with_suffix(".parquet"), stem.with_suffix(".csv")]


def _write_csv(rows: list[dict[str, Any]], path: Path, fieldnames: list[str]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _response_table(results: list[ModelSignals], instances: list) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in RESPONSE_COLUMNS}
    for result in results:
        c = result.columns
        n = len(c["length"])
        out["model"] += [result.label] * n
        out["prompt_id"] += [instances[g].id for g in c["prompt_index"]]
        for name in RESPONSE_COLUMNS:
            if name not in ("model", "prompt_id"):
                out[name] += list(c[name])
    return out


def _eigen_table(results: list[ModelSignals]) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in EIGEN_COLUMNS}
    for result in results:
        n = len(result.eigen["mode"])
        out["model"] += [result.label] * n
        for name in EIGEN_COLUMNS[1:]:
            out[name] += result.eigen[name]
    return out


def _col(result: ModelSignals, name: str) -> np.ndarray:
    return np.asarray(result.columns[name], dtype=np.float64)


def _nanstat(values: np.ndarray, fn) -> float:
    values = values[np.isfinite(values)]
    return float(fn(values)) if len(values) else math.nan


def _model_summary(result: ModelSignals, dispersion: dict[str, np.ndarray] | None) -> dict[str, Any]:
    c = result.columns
    moduli = result.moduli[np.isfinite(result.moduli).all(axis=1)] if result.moduli.size else result.moduli
    row: dict[str, Any] = dict(
        model=result.label, spec=result.spec, hidden_size=result.hidden_size, m=result.m,
        dictionary=result.dictionary_source, responses=len(c["length"]),
        prompts=len(set(c["prompt_index"])), accuracy=float(np.mean(c["correct"])),
        empty_responses=sum(1 for t in c["text"] if not t.strip()),
        length=_nanstat(_col(result, "length"), np.mean),
    )
    for name in ("entropy", "confidence", "er", "erv", "era", "dsd", "spectral_radius", "median_residual"):
        row[name] = _nanstat(_col(result, name), np.mean)
        row[f"{name}_defined"] = int(np.isfinite(_col(result, name)).sum())
    row["dsd_median"] = _nanstat(_col(result, "dsd"), np.median)
    row["modes_outside_unit_circle"] = float((moduli > 1.0 + 1e-9).mean()) if moduli.size else math.nan
    for measure in ("cv_er", "cv_dsd", "spectral_w1"):
        row[f"{measure}_median"] = _nanstat(np.asarray(dispersion[measure], dtype=np.float64), np.median) if dispersion else math.nan
    row["timings_s"] = {k: round(v, 3) for k, v in result.timings.items()}
    return row


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------------------
# the analysis
# ------------------------------------------------------------------------------------------------------


def run_analysis(cfg: AnalyzeConfig, progress: bool = True, log=print, strict: bool = False) -> Analysis:
    """Run the whole analysis described in the module docstring and write every output file.

    A model that fails (cannot be loaded, generation error, dictionary of the wrong size, ...) is reported in
    ``Analysis.failures`` and skipped; ``strict=True`` re-raises instead.  Raises :class:`AnalysisError`
    when the options or the problems are unusable, or when no model could be analysed.
    """
    import torch

    from latentx.analyze import figures as F
    from latentx.analyze.report import write_html
    from latentx.models import load_model

    started = time.perf_counter()
    out = Path(cfg.out).expanduser()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    default_stride, default_m = signal_defaults(cfg.max_new_tokens)
    settings = SignalSettings(stride=cfg.stride or default_stride, window=cfg.window, m=cfg.m or default_m,
                              fit_epochs=cfg.fit_epochs, fit_seed=cfg.seed, batch_size=cfg.batch_size,
                              examples=cfg.examples)
    task, instances, notes = build_instances(cfg.task, cfg.data, cfg.prompts, cfg.seed, cfg.task_options)
    for note in notes:
        log(f"note: {note}")
    if cfg.temperature == 0 and cfg.samples > 1:
        notes.append("--temperature 0 is greedy decoding: the R responses of a prompt are identical, so their "
                     "dispersion is 0 by construction")
        log(f"note: {notes[-1]}")
    if cfg.samples == 1:
        notes.append("--samples 1: one response per prompt, so the per-input dispersion (dispersion.csv and its "
                     "figure) needs R >= 2 and is left out; everything else is per response")
        log(f"note: {notes[-1]}")

    given = _given_dictionaries(cfg)
    labels = [parse_model_arg(arg) for arg in cfg.models]
    seen: dict[str, int] = {}
    for i, (label, spec) in enumerate(labels):  # unique labels: a, a-2, a-3
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = (f"{label}-{seen[label]}", spec)

    results: list[ModelSignals] = []
    failures: list[str] = []
    files: dict[str, Path] = {}
    for index, (label, spec) in enumerate(labels):
        try:
            dictionary, source = _model_dictionary(given, index, spec)
            if dictionary is not None and cfg.m is not None and dictionary.m != cfg.m:
                notes.append(f"model {label!r}: --m {cfg.m} ignored, its dictionary ({source}) has m = {dictionary.m}")
            if dictionary is not None:
                from latentx.dynamics import KoopmanSettings

                own = {k: v for k, v in dictionary.settings.as_dict().items() if v != getattr(KoopmanSettings, k)}
                if own:  # DSD and spectra use the settings the dictionary was fitted with (METHODS.md §2)
                    text = ", ".join(f"{k}={v!r}" for k, v in own.items())
                    notes.append(f"model {label!r}: DSD and spectra use its dictionary's own settings ({text})")
            log(f"[{index + 1}/{len(labels)}] {label}: loading {spec}")
            t0 = time.perf_counter()
            model, tokenizer = load_model(spec, device=cfg.device, dtype="float32", seed=cfg.seed)
            load_time = time.perf_counter() - t0
            width = getattr(model.config, "hidden_size", None)
            if dictionary is not None and width is not None and dictionary.hidden_size != width:
                raise AnalysisError(f"the Koopman dictionary ({source}) expects hidden size {dictionary.hidden_size} "
                                    f"but model {label!r} has {width}")
            result = compute_model_signals(
                label, spec, model, tokenizer, task, instances, cfg.samples, cfg.max_new_tokens, settings,
                temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, dictionary=dictionary,
                dictionary_source=source, progress=progress,
            )
            result.timings["load"] = load_time
            if cfg.image_blind:  # the image-blind control: same model, prompts and dictionary, blank images
                from latentx.vision import blank_images

                results.append(result)
                result = compute_model_signals(
                    f"{label}-noimage", spec, model, tokenizer, blank_images(task), instances, cfg.samples,
                    cfg.max_new_tokens, settings, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                    dictionary=dictionary, dictionary_source=source, progress=progress,
                )
            del model, tokenizer
            gc.collect()
        except Exception as error:  # noqa: BLE001 - one bad model must not lose the others' results
            if strict:
                raise
            failures.append(f"model {label!r} ({spec}): {type(error).__name__}: {error}")
            log(f"error: {failures[-1]}")
            continue
        for note in result.notes:
            log(f"note: {note}")
        notes += result.notes
        results.append(result)
        files["responses"], files["responses_csv"] = _write_table(_response_table(results, instances), out / "responses")
        files["eigenvalues"], files["eigenvalues_csv"] = _write_table(_eigen_table(results), out / "eigenvalues")
    if not results:
        raise AnalysisError("no model could be analysed: " + "; ".join(failures))

    # statistics
    correlations: dict[str, CorrelationMatrix] = {}
    corr_rows: list[dict[str, Any]] = []
    for result in results:
        columns = {name: _col(result, name) for name in CORRELATION_SIGNALS}
        for method in ("spearman", "pearson"):
            cm = correlation_matrix(columns, method, cfg.ci_level)
            corr_rows += [dict(model=result.label, **row) for row in cm.rows()]
            if method == cfg.method:
                correlations[result.label] = cm
    files["correlations"] = _write_csv(corr_rows, out / "correlations.csv",
                                       ["model", "x", "y", "method", "coefficient", "ci_low", "ci_high", "ci_level", "n"])
    dispersion: dict[str, dict[str, np.ndarray]] = {}
    if cfg.samples >= 2:
        rows = []
        for result in results:
            d = group_dispersion(np.asarray(result.columns["prompt_index"]), _col(result, "er_matched"),
                                 _col(result, "dsd_matched"), result.matched_moduli)
            dispersion[result.label] = d
            for i, g in enumerate(d["group"]):
                rows.append(dict(model=result.label, prompt_index=int(g), prompt_id=instances[int(g)].id,
                                 responses=int(d["responses"][i]), cv_er=d["cv_er"][i], cv_dsd=d["cv_dsd"][i],
                                 spectral_w1=d["spectral_w1"][i]))
        files["dispersion"] = _write_csv(rows, out / "dispersion.csv",
                                         ["model", "prompt_index", "prompt_id", "responses", "cv_er", "cv_dsd", "spectral_w1"])
    examples: list[F.PrefixExample] = []
    prefix_rows = []
    for result in results:
        for rid, series in result.examples.items():
            c = result.columns
            examples.append(F.PrefixExample(result.label, rid, series, int(c["length"][rid]), float(c["erv"][rid]),
                                            float(c["era"][rid]), bool(c["correct"][rid])))
            windows = set(series.window_sizes.tolist())
            for size, er in zip(series.dense_sizes.tolist(), series.dense_er.tolist()):
                prefix_rows.append(dict(model=result.label, response_id=rid, prefix_tokens=size + series.tail_start,
                                        tail_rows=size, er=er, is_window=size in windows))
    files["prefix_er"] = _write_csv(prefix_rows, out / "prefix_er.csv",
                                    ["model", "response_id", "prefix_tokens", "tail_rows", "er", "is_window"])

    # figures
    model_labels = [r.label for r in results]
    table = _response_table(results, instances)
    model_col, correct_col = np.asarray(table["model"]), np.asarray(table["correct"], dtype=bool)
    made: dict[str, Any] = {
        "eigenvalues": F.eigenvalue_figure([(r.label, np.asarray(r.eigen["real"]), np.asarray(r.eigen["imag"]),
                                             np.asarray(r.eigen["residual"])) for r in results]),
        "distributions": F.distribution_figure(model_labels, model_col, correct_col,
                                               {k: np.asarray(table[k], dtype=np.float64) for k in DISTRIBUTION_SIGNALS}),
        "correlations": F.correlation_figure([(label, cm) for label, cm in correlations.items()]),
        "prefix_er": F.prefix_figure(examples),
    }
    if dispersion:
        made["dispersion"] = F.dispersion_figure(model_labels, dispersion)
    figure_paths: dict[str, Path] = {}
    figure_png: dict[str, bytes] = {}
    for name, fig in made.items():
        png = F.png_bytes(fig)
        path = out / "figures" / f"{name}.png"
        path.write_bytes(png)
        figure_paths[name], figure_png[name] = path, png

    summary = [_model_summary(r, dispersion.get(r.label)) for r in results]
    timings = {"total": time.perf_counter() - started}
    analysis = Analysis(cfg, out, settings, results, summary, correlations, figure_paths, figure_png, files,
                        notes, failures, timings)
    files["report"] = write_html(analysis, out / "report.html")
    files["summary"] = out / "summary.json"
    summary_json = dict(
        config=asdict(cfg), signals=asdict(settings), models=summary, notes=notes, failures=failures,
        figures={k: str(v) for k, v in figure_paths.items()}, files={k: str(v) for k, v in files.items()},
        timings_s=timings, instances=[dict(id=inst.id, prompt=inst.prompt, answer=inst.answer) for inst in instances],
        torch_threads=torch.get_num_threads(),
    )
    files["summary"].write_text(json.dumps(_json_safe(summary_json), indent=2))
    return analysis
