"""Evaluation: sample n responses per problem, grade them, report Mean@n and unbiased Pass@k.

Python API
----------
- :func:`evaluate_model` — one list of problems with an already loaded HF model (the training loop's
  final evaluation reuses it with its own task prompts and reward through ``template`` / ``grader``).
- :func:`run_evaluation` — what ``latentx eval`` does: load a model spec, several benchmarks, apply a
  protocol, write ``eval.json`` and ``samples.jsonl``.
- :func:`regrade` — grade the stored responses of a run directory again (no generation).

Protocols (``--protocol``) fix the sampling per benchmark, following the two papers (METHODS.md §4);
options given explicitly on the command line override them for every benchmark:

========  ====================================================================================
relax     MATH500, Minerva (and any other benchmark): Mean@1, greedy (n = 1, temperature 0).
          AMC23, AIME24, AIME25: Mean@32 at temperature 1.0 (n = 32, top-p 1.0).
verl      temperature 0.6, top-p 0.95; Pass@k for k = 1, 2, 4, ... n with n = 16 (MATH500 and any
          other benchmark), 128 (AMC23), 256 (AIME24, AIME25).
========  ====================================================================================

Without a protocol the defaults are n = 1, greedy, max 1024 new tokens. ``ks`` default to the powers
of two up to n, plus n. Greedy decoding with n > 1 generates once and repeats the response n times.

Backends: Hugging Face ``generate`` (batched, left padding, progress bar) always; vLLM when ``vllm``
is importable, a GPU is present and the model is a path or hub id (``--backend auto``, the default).
Both produce the same records. Prompts are tokenised exactly as rendered (no special tokens added),
as in :mod:`latentx.rollout`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterable, Optional, Sequence, Union

import typer

from latentx.config import parse_int_list
from latentx.metrics import aggregate, average_over_benchmarks, default_ks, problem_counts
from latentx.templates import PromptTemplate, get_template

if TYPE_CHECKING:  # importing latentx.tasks pulls in the task registry (reasoning-gym): keep it lazy
    from latentx.tasks.benchmarks import Problem

__all__ = [
    "SamplingSettings",
    "Completion",
    "SampleRecord",
    "BenchmarkResult",
    "PROTOCOLS",
    "resolve_settings",
    "generate_hf",
    "generate_vllm",
    "evaluate_model",
    "evaluate_problems",
    "evaluate_task",
    "results_summary",
    "held_out_evaluation",
    "headline_metrics",
    "run_evaluation",
    "regrade",
    "print_results",
    "eval_command",
]

#: ``grader(response, problem) -> bool`` (or a reward in [0, 1], where >= 1 means correct).
Grader = Callable[[str, "Problem"], Union[bool, float]]
#: ``template(problem, tokenizer) -> prompt`` for callers with their own prompt format.
TemplateLike = Union[str, PromptTemplate, Callable[["Problem", Any], str]]

#: Fields of a benchmark's ``eval.json`` entry computed from its samples (recomputed by :func:`regrade`).
SUMMARY_FIELDS = ("settings", "num_samples", "mean_response_tokens", "truncated_fraction", "no_answer_fraction",
                  "generation_seconds", "correct_counts", "distinct_correct_per_problem")

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "eval.json"

PROTOCOLS: dict[str, dict[str, dict[str, Any]]] = {
    "relax": {
        "default": {"n": 1, "temperature": 0.0, "top_p": 1.0},
        "amc23": {"n": 32, "temperature": 1.0, "top_p": 1.0},
        "aime24": {"n": 32, "temperature": 1.0, "top_p": 1.0},
        "aime25": {"n": 32, "temperature": 1.0, "top_p": 1.0},
    },
    "verl": {
        "default": {"n": 16, "temperature": 0.6, "top_p": 0.95},
        "math500": {"n": 16},
        "amc23": {"n": 128},
        "aime24": {"n": 256},
        "aime25": {"n": 256},
    },
}


@dataclass(frozen=True)
class SamplingSettings:
    """How one benchmark is sampled. ``ks=None`` means :func:`latentx.metrics.default_ks` of ``n``."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    ks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        ks = default_ks(self.n) if self.ks is None else tuple(self.ks)
        if not ks:
            raise ValueError("ks must not be empty")
        for k in ks:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n:
                raise ValueError(f"every k in ks must be an int in [1, n={self.n}], got {k!r}")
        object.__setattr__(self, "ks", tuple(sorted(set(ks))))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def resolve_settings(
    benchmark: str,
    protocol: str | None = None,
    n: int | None = None,
    ks: Sequence[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
) -> SamplingSettings:
    """Settings of ``benchmark``: explicit arguments (not None) > the protocol's preset > defaults.

    When ``n`` comes from the protocol, ks larger than it are dropped (with a warning); otherwise a k
    larger than n is an error.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    preset: dict[str, Any] = {}
    if protocol is not None:
        table = PROTOCOLS[protocol]
        preset = {**table["default"], **table.get(benchmark, {})}
    values = {**preset}
    explicit = {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    values.update({key: value for key, value in explicit.items() if value is not None})
    chosen_n = values.get("n", 1)
    chosen_ks: tuple[int, ...] | None = tuple(ks) if ks is not None else None
    if chosen_ks is not None and n is None and protocol is not None:
        kept = tuple(k for k in chosen_ks if k <= chosen_n)
        if len(kept) < len(chosen_ks):
            warnings.warn(f"{benchmark}: n = {chosen_n} (protocol {protocol}); dropping k > n from {list(chosen_ks)}")
        chosen_ks = kept or (chosen_n,)
    return SamplingSettings(
        n=chosen_n,
        temperature=float(values.get("temperature", 0.0)),
        top_p=float(values.get("top_p", 1.0)),
        max_new_tokens=values.get("max_new_tokens", 1024),
        ks=chosen_ks,
    )


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    truncated: bool  # stopped by max_new_tokens rather than by an end-of-sequence token


@dataclass
class SampleRecord:
    """One graded response (a row of ``samples.jsonl``)."""

    benchmark: str
    problem_id: str
    sample: int
    response: str
    extracted: str | None
    gold: str
    correct: bool
    num_tokens: int = 0
    truncated: bool = False


@dataclass
class BenchmarkResult:
    name: str
    settings: SamplingSettings
    metrics: dict[str, float]
    samples: list[SampleRecord]
    num_problems: int
    source: str = ""
    generation_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def correct_counts(self) -> list[int]:
        """Correct samples per problem (out of ``settings.n``), in problem order: any Pass@k can be recomputed."""
        return [c for _, c in problem_counts([s.problem_id for s in self.samples],
                                             [s.correct for s in self.samples]).values()]

    def distinct_correct(self) -> float:
        """Mean over problems of the number of distinct (whitespace-stripped) correct responses."""
        distinct: dict[str, set[str]] = {}
        for s in self.samples:
            entry = distinct.setdefault(s.problem_id, set())
            if s.correct:
                entry.add(s.response.strip())
        return sum(len(v) for v in distinct.values()) / max(len(distinct), 1)

    def summary(self) -> dict[str, Any]:
        """The entry of this benchmark in ``eval.json``."""
        tokens = [s.num_tokens for s in self.samples]
        return {
            "source": self.source,
            "num_problems": self.num_problems,
            "num_samples": len(self.samples),
            "settings": asdict(self.settings) | {"ks": list(self.settings.ks or ())},
            "metrics": self.metrics,
            "mean_response_tokens": sum(tokens) / len(tokens) if tokens else 0.0,
            "truncated_fraction": sum(s.truncated for s in self.samples) / max(len(self.samples), 1),
            "no_answer_fraction": sum(s.extracted is None for s in self.samples) / max(len(self.samples), 1),
            "generation_seconds": round(self.generation_seconds, 3),
            "correct_counts": self.correct_counts(),
            "distinct_correct_per_problem": self.distinct_correct(),
            **self.extra,
        }


# --------------------------------------------------------------------------------------------------
# Generation backends
# --------------------------------------------------------------------------------------------------


def generate_hf(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: SamplingSettings,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generating",
    extra_inputs: Sequence[dict[str, Any]] | None = None,
    images: Sequence[Sequence[Any]] | None = None,
) -> list[list[Completion]]:
    """``settings.n`` completions per prompt through the one generation core,
    :func:`latentx.rollout.sample_responses` (batched, left-padded, longest prompts first, stop tokens of
    the generation config).  Sampling draws from a forked torch RNG seeded with ``seed``, so the caller's
    random state is untouched.  ``extra_inputs``: one dict of extra model inputs per prompt, ``images``: one
list of images per prompt for a vision-language model (see there).
    """
    from latentx.rollout import sample_responses

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not prompts:
        return []
    if settings.greedy and settings.n > 1:
        warnings.warn(f"greedy decoding (temperature 0) with n = {settings.n}: generating once, repeating {settings.n}x")
    seqs = sample_responses(
        model, tokenizer, list(prompts), settings.n, settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p, generation_batch_size=batch_size, seed=seed,
        extra_inputs=list(extra_inputs) if extra_inputs is not None else None, progress=progress, desc=desc,
        images=list(images) if images is not None else None,
    )
    num_tokens = seqs.response_mask.sum(1).tolist()
    ended = seqs.ended.tolist() if seqs.ended is not None else [False] * len(num_tokens)
    flat = [Completion(text, int(t), not e) for text, t, e in zip(seqs.texts, num_tokens, ended)]
    return [flat[i * settings.n : (i + 1) * settings.n] for i in range(len(prompts))]


def generate_vllm(
    model_path: str,
    prompts: Sequence[str],
    settings: SamplingSettings,
    seed: int = 0,
    llm: Any | None = None,
) -> list[list[Completion]]:  # pragma: no cover - needs vllm and a GPU
    """The vLLM equivalent of :func:`generate_hf` (same records); ``llm`` reuses an engine."""
    from vllm import LLM, SamplingParams

    engine = llm if llm is not None else LLM(model=model_path, seed=seed)
    tokenizer = engine.get_tokenizer()
    params = SamplingParams(
        n=1 if settings.greedy else settings.n,
        temperature=settings.temperature,
        top_p=settings.top_p if not settings.greedy else 1.0,
        max_tokens=settings.max_new_tokens,
        seed=seed,
    )
    token_prompts = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    outputs = engine.generate(token_prompts, params)
    rows = [
        [Completion(o.text, len(o.token_ids), o.finish_reason == "length") for o in out.outputs] for out in outputs
    ]
    return [row * settings.n if settings.greedy else row for row in rows]


def _vllm_usable(model_spec: str) -> bool:
    import importlib.util

    if model_spec == "tiny" or model_spec.endswith(".gguf") or "::" in model_spec:
        return False
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# Grading and metrics
# --------------------------------------------------------------------------------------------------


def _is_correct(value: bool | float) -> bool:
    if isinstance(value, bool):
        return value
    return float(value) >= 1.0


def _grade(
    responses: list[str], problems: list[Problem], grader: Grader | None, timeout: float, workers: int | None
) -> list[bool]:
    from latentx.tasks.grading import grade_many

    if grader is None:
        return grade_many(responses, [p.answer for p in problems], timeout=timeout, workers=workers)
    return [_is_correct(grader(response, problem)) for response, problem in zip(responses, problems)]


def _render(template: TemplateLike, problem: Problem, tokenizer: Any) -> str:
    if isinstance(template, (str, PromptTemplate)):
        return get_template(template).render(problem.problem, tokenizer)
    return template(problem, tokenizer)


def evaluate_problems(
    problems: Sequence[Problem],
    settings: SamplingSettings,
    generate: Callable[[list[str], SamplingSettings], list[list[Completion]]],
    tokenizer: Any,
    template: TemplateLike = "qwen-boxed",
    grader: Grader | None = None,
    benchmark: str = "eval",
    timeout: float = 5.0,
    workers: int | None = None,
    source: str = "",
) -> BenchmarkResult:
    """Render prompts, call ``generate(prompts, settings)``, grade, and compute the metrics."""
    from latentx.tasks.grading import extract_answer

    problems = list(problems)
    if not problems:
        raise ValueError("problems must not be empty")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids must be unique")
    prompts = [_render(template, p, tokenizer) for p in problems]
    start = time.perf_counter()
    completions = generate(prompts, settings)
    seconds = time.perf_counter() - start
    if len(completions) != len(problems) or any(len(row) != settings.n for row in completions):
        raise RuntimeError(f"generation returned the wrong number of completions (expected {settings.n} per problem)")
    flat = [(p, j, c) for p, row in zip(problems, completions) for j, c in enumerate(row)]
    correct = _grade([c.text for _, _, c in flat], [p for p, _, _ in flat], grader, timeout, workers)
    samples = [
        SampleRecord(benchmark, p.id, j, c.text, extract_answer(c.text), p.answer, ok, c.num_tokens, c.truncated)
        for (p, j, c), ok in zip(flat, correct)
    ]
    return BenchmarkResult(
        name=benchmark,
        settings=settings,
        metrics=_metrics(samples, settings),
        samples=samples,
        num_problems=len(problems),
        source=source,
        generation_seconds=seconds,
    )


def _metrics(samples: Sequence[SampleRecord], settings: SamplingSettings) -> dict[str, float]:
    counts = problem_counts([s.problem_id for s in samples], [s.correct for s in samples])
    return aggregate(counts.values(), settings.ks or (1,))


def evaluate_model(
    model: Any,
    tokenizer: Any,
    problems: Iterable[Problem],
    n: int = 1,
    ks: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    template: TemplateLike = "qwen-boxed",
    batch_size: int = 8,
    grader: Grader | None = None,
    seed: int = 0,
    progress: bool = True,
    benchmark: str = "eval",
    timeout: float = 5.0,
    workers: int | None = None,
) -> BenchmarkResult:
    """Sample ``n`` responses per problem with a loaded HF model and report Mean@n and Pass@k.

    ``grader(response, problem)`` returns True / False or a reward (>= 1 counts as correct); the default
    is the math grader against ``problem.answer`` on a worker pool. ``template`` is a template name /
    string / :class:`PromptTemplate`, or a callable ``(problem, tokenizer) -> prompt``.
    """
    settings = SamplingSettings(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                ks=tuple(ks) if ks is not None else None)
    generate = functools.partial(
        generate_hf, model, tokenizer, batch_size=batch_size, seed=seed, progress=progress, desc=benchmark
    )
    return evaluate_problems(list(problems), settings, generate, tokenizer, template, grader, benchmark, timeout, workers)


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: Any,
    instances: Sequence[Any],
    settings: SamplingSettings,
    benchmark: str = "eval",
    **sampling: Any,
) -> BenchmarkResult:
    """:func:`evaluate_problems` on a training task's instances: the task's own prompt builder
    (``task.format_prompt``) and verifier (``task.is_correct``) instead of a template and the math grader.

    ``sampling``: :func:`generate_hf`'s ``batch_size``, ``seed`` and ``progress`` (default: no progress bar).
    """
    from latentx.tasks.benchmarks import Problem

    instances = list(instances)
    ids = [str(inst.id) for inst in instances]
    if len(set(ids)) != len(ids):  # instance ids are not guaranteed unique: fall back to positions
        ids = [str(i) for i in range(len(instances))]
    by_id = dict(zip(ids, instances))
    problems = [Problem(pid, inst.prompt, str(inst.answer)) for pid, inst in zip(ids, instances)]
    from latentx.vision import task_images

    images = task_images(task, instances)  # in problem order, as evaluate_problems renders the prompts
    generate = functools.partial(generate_hf, model, tokenizer, **{"progress": False, **sampling}, desc=benchmark,
                                 images=images)
    return evaluate_problems(
        problems, settings, generate, tokenizer,
        template=lambda problem, tok: task.format_prompt(by_id[problem.id], tok),
        grader=lambda response, problem: task.is_correct(by_id[problem.id], response),
        benchmark=benchmark, source=getattr(task, "name", ""),
    )


def results_summary(header: dict[str, Any], results: Sequence[BenchmarkResult], average: bool = True) -> dict[str, Any]:
    """The ``eval.json`` document: ``header`` fields, one entry per benchmark, and (``average``) their average."""
    per_benchmark = {r.name: r.summary() for r in results}
    summary = {**header, "benchmarks": per_benchmark}
    if average:
        summary["average"] = average_over_benchmarks({name: b["metrics"] for name, b in per_benchmark.items()})
    return summary


#: The two benchmark entries of a held-out evaluation (:func:`held_out_evaluation`).
GREEDY, SAMPLED = "greedy", "sampled"


def held_out_evaluation(
    model: Any,
    tokenizer: Any,
    task: Any,
    instances: int,
    n: int,
    ks: Sequence[int],
    temperature: float,
    seed: int,
    max_new_tokens: int,
    top_p: float = 1.0,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """The training task's held-out evaluation (METHODS.md §4), in ``eval.json``'s schema.

    ``instances`` problems of ``task.eval_instances(instances, seed)``, scored by the task's verifier:
    benchmark ``"greedy"`` (n = 1, temperature 0: Mean@1 greedy) and benchmark ``"sampled"`` (``n``
    samples at ``temperature``: Mean@n and Pass@k for ``ks``, with per-problem ``correct_counts``).  Both
    sample with a forked RNG seeded with ``seed``: the caller's random streams do not move.  The trainer
    writes it to ``summary.json``; ``latentx study`` evaluates finished runs with it.
    """
    problems = task.eval_instances(instances, seed=seed)
    greedy = evaluate_task(model, tokenizer, task, problems, SamplingSettings(n=1, max_new_tokens=max_new_tokens),
                           batch_size=batch_size, seed=seed, progress=progress, benchmark=GREEDY)
    sampled_settings = SamplingSettings(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                        ks=tuple(ks))
    sampled = evaluate_task(model, tokenizer, task, problems, sampled_settings, batch_size=batch_size, seed=seed,
                            progress=progress, benchmark=SAMPLED)
    header = {"task": getattr(task, "name", ""), "instances": len(problems), "seed": seed}
    return results_summary(header, [greedy, sampled], average=False)


def headline_metrics(evaluation: dict[str, Any]) -> dict[str, Any]:
    """A held-out evaluation (:func:`held_out_evaluation`) as flat headline numbers:
    ``mean@1_greedy``, ``mean@<n>``, ``pass@k`` (``{"1": ..., "4": ...}``), ``distinct_correct_per_problem``,
    ``correct_counts`` (of the sampled run), ``n`` and ``instances``.  Raises ``ValueError`` naming what is
    missing when ``evaluation`` is not one."""
    benchmarks = evaluation.get("benchmarks") if isinstance(evaluation, dict) else None
    if not isinstance(benchmarks, dict) or GREEDY not in benchmarks or SAMPLED not in benchmarks:
        raise ValueError(f"not a held-out evaluation: needs benchmarks {GREEDY!r} and {SAMPLED!r}, "
                         f"got {sorted(benchmarks) if isinstance(benchmarks, dict) else evaluation!r}")
    greedy, sampled = benchmarks[GREEDY], benchmarks[SAMPLED]
    n = int(sampled["settings"]["n"])
    return {
        "instances": int(sampled["num_problems"]),
        "n": n,
        "mean@1_greedy": float(greedy["metrics"]["mean@1"]),
        f"mean@{n}": float(sampled["metrics"][f"mean@{n}"]),
        "pass@k": {key[len("pass@"):]: float(v) for key, v in sampled["metrics"].items() if key.startswith("pass@")},
        "distinct_correct_per_problem": float(sampled["distinct_correct_per_problem"]),
        "correct_counts": [int(c) for c in sampled["correct_counts"]],
    }


# --------------------------------------------------------------------------------------------------
# Runs: files, regrading, the table
# --------------------------------------------------------------------------------------------------


def _write_run(out_dir: Path, header: dict[str, Any], results: list[BenchmarkResult]) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = results_summary(header, results)
    with (out_dir / SAMPLES_FILE).open("w", encoding="utf-8") as handle:
        for result in results:
            for sample in result.samples:
                handle.write(json.dumps(asdict(sample), ensure_ascii=False) + "\n")
    (out_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def run_evaluation(
    model: str,
    benchmarks: Sequence[str],
    out_dir: str | Path,
    protocol: str | None = None,
    n: int | None = None,
    ks: Sequence[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    template: str = "qwen-boxed",
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    backend: str = "auto",
    timeout: float = 5.0,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate model spec ``model`` on ``benchmarks`` (names or paths); write and return ``eval.json``."""
    from latentx.tasks.benchmarks import load_benchmark

    if not benchmarks:
        raise ValueError("benchmarks must name at least one benchmark")
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"backend must be 'auto', 'hf' or 'vllm', got {backend!r}")
    from latentx.models import TINY_SPEC, resolve_model_path
    from latentx.tasks.grading import validate_grading_args

    validate_grading_args(timeout, workers)  # before anything is loaded or generated
    if model != TINY_SPEC:
        resolve_model_path(model)
    prompt_template = get_template(template)
    loaded = [load_benchmark(spec, limit=limit) for spec in benchmarks]
    for bench in loaded:
        _refuse_images(bench)
    names = _unique_names([b.name for b in loaded])
    settings = {name: resolve_settings(b.name, protocol, n, ks, temperature, top_p, max_new_tokens)
                for name, b in zip(names, loaded)}

    use_vllm = backend == "vllm" or (backend == "auto" and _vllm_usable(model))
    if use_vllm:  # pragma: no cover - needs vllm and a GPU
        from vllm import LLM

        from latentx.models import resolve_model_path

        where, _ = resolve_model_path(model)
        engine = LLM(model=where, seed=seed)
        tokenizer = engine.get_tokenizer()
        sample = functools.partial(generate_vllm, where, seed=seed, llm=engine)
    else:
        import torch

        from latentx.models import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        hf_model, tokenizer = load_model(model, device=device, dtype=dtype, seed=seed)
        sample = functools.partial(generate_hf, hf_model, tokenizer, batch_size=batch_size, seed=seed,
                                   progress=progress)

    results = []
    for name, bench in zip(names, loaded):
        generate = sample if use_vllm else functools.partial(sample, desc=name)
        results.append(
            evaluate_problems(bench.problems, settings[name], generate, tokenizer, prompt_template, None, name,
                              timeout, workers, source=bench.source)
        )
    header = {
        "latentx_version": _version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "template": prompt_template.name,
        "protocol": protocol,
        "seed": seed,
        "backend": "vllm" if use_vllm else "hf",
        "limit": limit,
        "grader": {"name": "math-verify", "timeout": timeout},
    }
    return _write_run(Path(out_dir), header, results)


def _refuse_images(bench) -> None:
    """``latentx eval`` renders text prompts only: a benchmark whose problems carry images is a one-line
    error (graded on its text alone, it would be scored without the pictures)."""
    from latentx.tasks.vmath import IMAGE_KEYS

    for problem in bench.problems:
        column = next((key for key in IMAGE_KEYS if problem.meta.get(key)), None)
        if column is not None:
            raise ValueError(
                f"latentx eval: benchmark {bench.name!r} has images (column {column!r}, problem {problem.id}) but "
                "eval renders text prompts only; use it as the vmath task (latentx train --task vmath --set "
                f"task.data_path={bench.source or bench.name}, or latentx analyze --task vmath --task-option path=...)"
            )


def _version() -> str:
    from latentx import __version__

    return __version__


def regrade(
    run_dir: str | Path,
    grader: Grader | None = None,
    timeout: float = 5.0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Grade the responses stored in ``run_dir/samples.jsonl`` again and rewrite both files.

    A custom ``grader`` receives a :class:`Problem` with the stored id and gold answer (the problem text
    is not stored, so ``problem.problem`` is empty).
    """
    from latentx.tasks.benchmarks import Problem
    from latentx.tasks.grading import extract_answer, validate_grading_args

    validate_grading_args(timeout, workers)

    run = Path(run_dir)
    results_path, samples_path = run / RESULTS_FILE, run / SAMPLES_FILE
    for path in (results_path, samples_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run} a `latentx eval` output directory?")
    summary = json.loads(results_path.read_text(encoding="utf-8"))
    samples: list[SampleRecord] = []
    with samples_path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                samples.append(SampleRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(f"{samples_path} line {number}: not a sample record ({error})") from None
    problems = [Problem(s.problem_id, "", s.gold) for s in samples]
    correct = _grade([s.response for s in samples], problems, grader, timeout, workers)
    for sample, ok in zip(samples, correct):
        sample.correct = ok
        sample.extracted = extract_answer(sample.response)
    header = {key: value for key, value in summary.items() if key not in ("benchmarks", "average")}
    header["regraded"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    header["grader"] = {"name": "math-verify" if grader is None else getattr(grader, "__name__", "custom"),
                        "timeout": timeout}
    results = []
    for name, entry in summary["benchmarks"].items():
        mine = [s for s in samples if s.benchmark == name]
        if not mine:
            raise ValueError(f"{samples_path}: no samples for benchmark {name!r} listed in {results_path}")
        stored = entry["settings"]
        settings = SamplingSettings(n=stored["n"], temperature=stored["temperature"], top_p=stored["top_p"],
                                    max_new_tokens=stored["max_new_tokens"], ks=tuple(stored["ks"]))
        extra = {k: v for k, v in entry.items() if k not in BenchmarkResult.__dataclass_fields__
                 and k not in SUMMARY_FIELDS}
        results.append(BenchmarkResult(name, settings, _metrics(mine, settings), mine, entry["num_problems"],
                                       entry.get("source", ""), entry.get("generation_seconds", 0.0), extra))
    return _write_run(run, header, results)


def _metric_columns(summary: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for entry in summary["benchmarks"].values():
        for key in entry["metrics"]:
            if key not in keys:
                keys.append(key)

    def order(key: str) -> tuple[int, int]:
        name, _, k = key.partition("@")
        return (0 if name == "mean" else 1, int(k) if k.isdigit() else 0)

    return sorted(keys, key=order)


def print_results(summary: dict[str, Any], console: Any | None = None) -> None:
    """A rich table: one row per benchmark plus the average, metrics in percent."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    columns = _metric_columns(summary)
    table = Table(title=f"latentx eval — {summary.get('model', '?')}", show_lines=False)
    for header in ("benchmark", "problems", "n", "T", "top-p"):
        table.add_column(header, justify="left" if header == "benchmark" else "right")
    for column in columns:
        table.add_column(column, justify="right")
    for name, entry in summary["benchmarks"].items():
        s = entry["settings"]
        cells = [f"{100 * entry['metrics'][c]:.1f}" if c in entry["metrics"] else "" for c in columns]
        table.add_row(name, str(entry["num_problems"]), str(s["n"]), f"{s['temperature']:g}", f"{s['top_p']:g}", *cells)
    average = summary.get("average", {})
    if len(summary["benchmarks"]) > 1 and average:
        cells = [f"{100 * average[c]:.1f}" if c in average else "" for c in columns]
        table.add_row("average", "", "", "", "", *cells, style="bold")
        if "accuracy" in average:
            table.caption = f"average accuracy (mean@n of each benchmark): {100 * average['accuracy']:.1f}"
    console.print(table)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _default_out_dir(model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.split("::")[-1]).name or model).strip("-") or "model"
    return Path("runs") / "eval" / f"{slug}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def eval_command(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model spec: tiny, HF dir, hub id, .gguf, dir::file.gguf or a run dir.")] = None,
    benchmarks: Annotated[str, typer.Option("--benchmarks", "-b", help="Comma-separated known names or files.")] = "math500",
    n: Annotated[Optional[int], typer.Option("--n", help="Samples per problem (default 1, or the protocol's).")] = None,
    k: Annotated[Optional[str], typer.Option("--k", help="Comma-separated k for pass@k (default 1,2,4,...,n).")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy (default 0, or the protocol's).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling (default 1.0, or the protocol's).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Default 1024.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N problems of each benchmark.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (default runs/eval/<model>-<time>).")] = None,
    template: Annotated[str, typer.Option("--template", help="qwen-boxed, plain, a string with {problem}, or a file.")] = "qwen-boxed",
    protocol: Annotated[Optional[str], typer.Option("--protocol", help="Sampling preset per benchmark: relax or verl.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per generate call (HF backend).")] = 8,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda when available).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16, float16 or auto (default: the model's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    backend: Annotated[str, typer.Option("--backend", help="auto (vLLM when installed and on a GPU), hf or vllm.")] = "auto",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds allowed per answer check.")] = 5.0,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Grading processes (default: CPU count).")] = None,
    regrade_dir: Annotated[Optional[Path], typer.Option("--regrade", help="Grade the samples of an eval output dir again.")] = None,
) -> None:
    """Evaluate a model on math benchmarks: Mean@n and unbiased Pass@k (writes eval.json, samples.jsonl)."""
    try:
        if regrade_dir is not None:
            summary = regrade(regrade_dir, timeout=timeout, workers=workers)
            print_results(summary)
            typer.echo(f"regraded {regrade_dir}")
            return
        if model is None:
            raise ValueError("--model is required (or --regrade DIR)")
        out_dir = out if out is not None else _default_out_dir(model)
        summary = run_evaluation(
            model=model,
            benchmarks=[b.strip() for b in benchmarks.split(",") if b.strip()],
            out_dir=out_dir,
            protocol=protocol,
            n=n,
            ks=parse_int_list(k, "--k") if k is not None else None,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            limit=limit,
            template=template,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            seed=seed,
            backend=backend,
            timeout=timeout,
            workers=workers,
        )
    except (ValueError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    print_results(summary)
    typer.echo(f"wrote {Path(out_dir) / RESULTS_FILE} and {Path(out_dir) / SAMPLES_FILE}")
