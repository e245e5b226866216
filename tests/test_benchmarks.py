from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from latentx.tasks.benchmarks import (
    KNOWN_BENCHMARKS,
    BenchmarkError,
    find_data_dir,
    load_benchmark,
)

EXPECTED_COUNTS = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva_math": 272, "gsm8k": 1319}
# References that math-verify keeps only as a string (no sympy object); graded by exact string match.
STRING_ONLY_GOLDS = {
    "np.arcsin(10/13)",
    "\\frac{dM}{dt}=\\frac{10^{5} L_{\\odot}}{0.007 c^{2} M_{\\odot}^{6}} M^{6}",
    "E_{1},E_{2}",
}

needs_shared_data = pytest.mark.skipif(find_data_dir() is None, reason="shared benchmark data not found")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


@needs_shared_data
@pytest.mark.parametrize("name", KNOWN_BENCHMARKS)
def test_shared_benchmarks_load_with_right_counts(name):
    bench = load_benchmark(name)
    assert bench.name == name
    assert len(bench) == EXPECTED_COUNTS[name]
    assert len({p.id for p in bench}) == len(bench)
    assert all(p.problem.strip() and p.answer.strip() for p in bench)


@needs_shared_data
def test_shared_benchmark_answers_are_final_answers():
    gsm8k = load_benchmark("gsm8k", limit=3)
    assert gsm8k.problems[0].answer == "18"  # from "... #### 18"
    assert "####" in gsm8k.problems[0].meta["answer"]
    amc = load_benchmark("amc23", limit=1)
    assert amc.problems[0].answer == "27"  # stored as the float 27.0
    minerva = load_benchmark("minerva_math", limit=2)
    assert minerva.problems[0].answer == "1.6"  # from the \boxed{} of the solution
    assert minerva.problems[1].answer == "4.5e33"
    aime25 = load_benchmark("aime25", limit=1)
    assert aime25.problems[0].problem.startswith("Find the sum of all integer bases")
    assert aime25.problems[0].answer == "70"
    math500 = load_benchmark("math500", limit=1)
    assert math500.problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math500.problems[0].meta["subject"] == "Precalculus"


@needs_shared_data
def test_every_shared_gold_answer_parses():
    from math_verify import parse

    from latentx.tasks.grading import _prepare, _wrap

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    string_only = set()
    for name in KNOWN_BENCHMARKS:
        for problem in load_benchmark(name):
            parsed = parse(_wrap(_prepare(problem.answer)), parsing_timeout=None)
            assert parsed, f"{name} {problem.id}: gold {problem.answer!r} does not parse"
            if isinstance(parsed[0], str):
                string_only.add(problem.answer)
    assert string_only == STRING_ONLY_GOLDS


def test_heterogeneous_schemas_and_explicit_keys(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"Question": "1+1?", "Answer": 2.0, "id": "a"},
            {"question": "half?", "answer": "\\frac12", "id": "b"},
            {"problem": "sol?", "solution": "so it is $\\boxed{\\frac{1}{2}}$.", "id": "c"},
            {"question": "gsm?", "answer": "2 + 2 = 4\n#### 4", "id": "d"},
            {"question": "zero-padded?", "answer": "025", "id": "e"},
        ],
    )
    bench = load_benchmark(path)
    assert bench.name == "mixed"
    assert [p.answer for p in bench] == ["2", "\\frac12", "\\frac{1}{2}", "4", "25"]
    assert [p.id for p in bench] == ["a", "b", "c", "d", "e"]
    assert bench.problems[2].meta["answer_field"] == "solution"

    explicit = write_jsonl(tmp_path / "explicit.jsonl", [{"q": "x?", "gold": 7, "answer": "ignored"}])
    problem = load_benchmark(explicit, problem_key="q", answer_key="gold").problems[0]
    assert (problem.problem, problem.answer) == ("x?", "7")
    with pytest.raises(BenchmarkError, match="line 1: no problem field 'prompt'"):
        load_benchmark(explicit, problem_key="prompt")


def test_malformed_rows_are_reported_with_line_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"problem": "ok?", "answer": "1"},
            "{not json",
            {"problem": "no answer"},
            {"answer": "3"},
            {"problem": "sol?", "solution": "no box here"},
            {"problem": "ok2?", "answer": 5},
            '["a list"]',
            {"problem": "", "answer": "1"},
            {"problem": "nan?", "answer": float("nan")},
        ],
    )
    with pytest.raises(BenchmarkError) as info:
        load_benchmark(path)
    message = str(info.value)
    assert "bad.jsonl" in message and "7 malformed line(s)" in message
    for line in (2, 3, 4, 5, 7, 8, 9):
        assert f"line {line}:" in message
    assert "line 1:" not in message and "line 6:" not in message
    assert "bad JSON" in message and "no answer field" in message

    with pytest.warns(UserWarning, match="7 malformed line"):
        bench = load_benchmark(path, on_error="skip")
    assert [p.answer for p in bench] == ["1", "5"]


def test_limit_and_argument_validation(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(5)])
    assert [p.answer for p in load_benchmark(path, limit=2)] == ["0", "1"]
    with pytest.raises(ValueError, match="limit"):
        load_benchmark(path, limit=0)
    with pytest.raises(ValueError, match="on_error"):
        load_benchmark(path, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nonexistent'"):
        load_benchmark("nonexistent")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BenchmarkError, match="no valid problems"):
        load_benchmark(empty)


def test_duplicate_ids_are_replaced(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"problem": "a", "answer": "1", "id": 0}] * 3)
    assert [p.id for p in load_benchmark(path)] == ["dup-0", "dup-1", "dup-2"]


def test_json_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "q1", "answer": 1.0}, {"question": "q2", "answer": 2.5}]
    (tmp_path / "b.json").write_text(json.dumps(rows))
    assert [p.answer for p in load_benchmark(tmp_path / "b.json")] == ["1", "2.5"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    bench = load_benchmark(tmp_path / "b.parquet")
    assert [p.answer for p in bench] == ["1", "2.5"]
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": None}]), tmp_path / "n.parquet")
    with pytest.raises(BenchmarkError, match="row 1: no answer field"):
        load_benchmark(tmp_path / "n.parquet")


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "aime24.jsonl", [{"problem": "p", "answer": "9"}])
    write_jsonl(tmp_path / "custom.jsonl", [{"problem": "p", "answer": "8"}])
    monkeypatch.setenv("LATENTX_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path
    assert load_benchmark("aime24").problems[0].answer == "9"
    assert load_benchmark("aime2024").name == "aime24"  # alias
    assert load_benchmark("custom").problems[0].answer == "8"


def test_hub_dataset_error_is_clear(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(BenchmarkError, match="datasets"):
        load_benchmark("someone/some-dataset@test")
