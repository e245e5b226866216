"""Math benchmarks as lists of (id, problem, reference answer): JSONL / JSON / Parquet files or HF datasets.

``load_benchmark(spec)`` accepts

- a known name — ``math500``, ``aime24``, ``aime25``, ``amc23``, ``minerva_math``, ``gsm8k`` (or any
  ``<name>.jsonl`` / ``.parquet`` in the data dir) — resolved in the data dir: ``$LATENTX_DATA_DIR``,
  else ``shared/data/benchmarks`` next to the current directory or next to the repository;
- a path to a ``.jsonl``, ``.json`` (a list of objects) or ``.parquet`` file;
- a Hugging Face dataset id, ``owner/name[:config][@split]`` (split defaults to ``test``), when the
  ``datasets`` package is installed and the hub is reachable.

Schemas differ between sources, so fields are looked up by candidate names (or given explicitly):
problem from ``problem`` / ``question`` / ``Question`` / ..., reference from ``answer`` / ``Answer`` /
``final_answer`` / ``solution`` / .... When the reference is a full solution (MATH / Minerva
``\\boxed{}``, GSM8K ``#### 72``) its final answer is extracted; numbers are normalised (``72.0`` → ``72``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from latentx.tasks.grading import extract_answer, normalize_number

__all__ = [
    "Problem",
    "Benchmark",
    "BenchmarkError",
    "KNOWN_BENCHMARKS",
    "load_benchmark",
    "find_data_dir",
    "PROBLEM_KEYS",
    "ANSWER_KEYS",
]

KNOWN_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math", "gsm8k")
_ALIASES = {
    "math-500": "math500",
    "math_500": "math500",
    "aime2024": "aime24",
    "aime_2024": "aime24",
    "aime2025": "aime25",
    "aime_2025": "aime25",
    "amc2023": "amc23",
    "minerva": "minerva_math",
    "minerva-math": "minerva_math",
}
PROBLEM_KEYS = ("problem", "question", "Question", "Problem", "prompt", "input")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "expected_answer", "target", "solution", "Solution")
ID_KEYS = ("id", "unique_id", "idx", "ID", "problem_id")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_MAX_LISTED_ERRORS = 20


class BenchmarkError(ValueError):
    """A benchmark could not be found or has malformed rows (the message names file and lines)."""


@dataclass(frozen=True)
class Problem:
    """One benchmark item. ``answer`` is the reference final answer as a string."""

    id: str
    problem: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Benchmark:
    name: str
    problems: list[Problem]
    source: str = ""

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


def find_data_dir() -> Path | None:
    """``$LATENTX_DATA_DIR``, else the first existing ``shared/data/benchmarks`` next to cwd / the repo."""
    env = os.environ.get("LATENTX_DATA_DIR")
    if env:
        return Path(env).expanduser()
    for candidate in _data_dir_candidates():
        if candidate.is_dir():
            return candidate
    return None


def _data_dir_candidates() -> list[Path]:
    cwd = Path.cwd()
    repo = Path(__file__).resolve().parents[3]  # src/latentx/tasks/benchmarks.py -> repo root
    return [
        cwd / "shared" / "data" / "benchmarks",
        cwd.parent / "shared" / "data" / "benchmarks",
        repo / "shared" / "data" / "benchmarks",
        repo.parent / "shared" / "data" / "benchmarks",
    ]


def _resolve_named(name: str) -> Path | None:
    canonical = _ALIASES.get(name.lower(), name.lower())
    data_dir = find_data_dir()
    if data_dir is None:
        return None
    for stem in dict.fromkeys((canonical, name)):
        for suffix in _FILE_SUFFIXES:
            path = data_dir / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def _format_number(value: float | int) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value!r}")
        if value.is_integer():
            return str(int(value))
    return normalize_number(str(value))


def _reference_answer(raw: Any, key: str) -> str:
    """Final answer string from a raw answer / solution field (raises ValueError with the reason)."""
    if raw is None:
        raise ValueError(f"field {key!r} is null")
    if isinstance(raw, bool):
        raise ValueError(f"field {key!r} is a boolean")
    if isinstance(raw, (int, float)):
        return _format_number(raw)
    if isinstance(raw, list) and len(raw) == 1:  # some datasets store [answer]
        return _reference_answer(raw[0], key)
    if not isinstance(raw, str):
        raise ValueError(f"field {key!r} has type {type(raw).__name__}, expected str or number")
    text = raw.strip()
    if not text:
        raise ValueError(f"field {key!r} is empty")
    if "\\boxed" in text or "\\fbox" in text or "####" in text:
        extracted = extract_answer(text)
        if not extracted:
            raise ValueError(f"no final answer found in field {key!r}")
        text = extracted
    elif key.lower() == "solution":
        raise ValueError(f"field {key!r} is a solution without \\boxed{{}} or '####' answer")
    return normalize_number(text)


def _pick(row: dict[str, Any], explicit: str | None, candidates: tuple[str, ...], what: str) -> str:
    if explicit is not None:
        if explicit not in row:
            raise ValueError(f"no {what} field {explicit!r} (fields: {', '.join(sorted(row))})")
        return explicit
    for key in candidates:
        if key in row and row[key] is not None and row[key] != "":
            return key
    raise ValueError(f"no {what} field (tried {', '.join(candidates)}; fields: {', '.join(sorted(row))})")


def _row_to_problem(
    row: Any, index: int, name: str, problem_key: str | None, answer_key: str | None
) -> Problem:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    p_key = _pick(row, problem_key, PROBLEM_KEYS, "problem")
    problem = row[p_key]
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"field {p_key!r} must be a non-empty string")
    a_key = _pick(row, answer_key, ANSWER_KEYS, "answer")
    answer = _reference_answer(row[a_key], a_key)
    id_key = next((k for k in ID_KEYS if row.get(k) is not None), None)
    problem_id = str(row[id_key]) if id_key else f"{name}-{index}"
    # keep every other field (solution, subject, level, ...) but not copies of the problem text
    meta = {k: v for k, v in row.items() if k != p_key and not (k in PROBLEM_KEYS and v == problem)}
    meta["answer_field"] = a_key
    return Problem(id=problem_id, problem=problem, answer=answer, meta=meta)


def _read_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line/row number, row or None, parse error) for every record of a file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row, None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise BenchmarkError(f"{path}: not valid JSON ({error}); use .jsonl for one object per line") from None
        if isinstance(data, dict):  # {"data": [...]} / {"rows": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise BenchmarkError(f"{path}: expected a JSON list of objects")
            data = lists[0]
        if not isinstance(data, list):
            raise BenchmarkError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        for i, row in enumerate(data, start=1):
            yield i, row, None
    else:
        with path.open(encoding="utf-8") as handle:
            for i, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line), None
                except json.JSONDecodeError as error:
                    yield i, None, f"bad JSON ({error.msg} at column {error.colno})"


def _load_hf(spec: str) -> tuple[list[dict[str, Any]], str]:
    try:
        import datasets
    except ImportError:
        raise BenchmarkError(
            f"{spec!r} is not a known benchmark name or an existing file, and loading it as a Hugging Face "
            "dataset needs the 'datasets' package (pip install datasets)"
        ) from None
    name, _, split = spec.partition("@")
    repo, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(repo, config or None, split=split or "test")
    except Exception as error:  # noqa: BLE001 - report any hub / network failure with the spec
        raise BenchmarkError(
            f"{spec!r} is not an existing file, and loading it as a Hugging Face dataset failed: "
            f"{type(error).__name__}: {error}"
        ) from None
    return [dict(row) for row in dataset], f"hf:{spec}"


def load_benchmark(
    name_or_path: str | os.PathLike[str],
    problem_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> Benchmark:
    """Load a benchmark by known name, file path or HF dataset id (see the module docstring).

    Malformed rows (bad JSON, missing / empty fields, a solution without a final answer) raise one
    :class:`BenchmarkError` listing their line numbers, or are skipped with a warning (``on_error="skip"``).
    ``limit`` keeps the first ``limit`` valid problems.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    spec = os.fspath(name_or_path)
    if not spec.strip():
        raise ValueError("name_or_path must not be empty")
    path = Path(spec).expanduser()
    records: Iterator[tuple[int, Any, str | None]]
    if path.is_file():
        name, source, records = path.stem, str(path), _read_rows(path)
    elif (named := _resolve_named(spec)) is not None:
        name, source, records = _ALIASES.get(spec.lower(), spec.lower()), str(named), _read_rows(named)
    elif "/" in spec and not path.suffix.lower() in _FILE_SUFFIXES and not path.exists():
        rows, source = _load_hf(spec)
        name = spec.split("@")[0].split(":")[0].split("/")[-1]
        records = ((i, row, None) for i, row in enumerate(rows, start=1))
    else:
        data_dir = find_data_dir()
        where = str(data_dir) if data_dir else "not found (set $LATENTX_DATA_DIR; looked in " + ", ".join(
            str(p) for p in _data_dir_candidates()) + ")"
        raise BenchmarkError(
            f"unknown benchmark {spec!r}: not a file, and not a known name ({', '.join(KNOWN_BENCHMARKS)}) "
            f"in the data dir {where}"
        )

    where_word = "row" if source.endswith((".parquet", ".json")) or source.startswith("hf:") else "line"
    problems: list[Problem] = []
    errors: list[str] = []
    for number, row, parse_error in records:
        if limit is not None and len(problems) >= limit:
            break
        if parse_error is None:
            try:
                problems.append(_row_to_problem(row, number, name, problem_key, answer_key))
                continue
            except ValueError as error:
                parse_error = str(error)
        errors.append(f"{where_word} {number}: {parse_error}")

    if errors:
        listed = "; ".join(errors[:_MAX_LISTED_ERRORS])
        more = f"; ... and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
        message = f"{source}: {len(errors)} malformed {where_word}(s): {listed}{more}"
        if on_error == "raise":
            raise BenchmarkError(message + " (pass on_error='skip' to skip them)")
        warnings.warn(message + " (skipped)", stacklevel=2)
    if not problems:
        raise BenchmarkError(f"{source}: no valid problems")
    seen: set[str] = set()
    for problem in problems:  # ids must be unique to count samples per problem
        if problem.id in seen:
            problems = [Problem(f"{name}-{n}", p.problem, p.answer, p.meta) for n, p in enumerate(problems)]
            break
        seen.add(problem.id)
    return Benchmark(name=name, problems=problems, source=source)
