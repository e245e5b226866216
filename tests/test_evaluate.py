"""Sampling settings and protocols, generation, metrics plumbing, the `latentx eval` CLI and regrading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from latentx.evaluate import (
    Completion,
    SamplingSettings,
    evaluate_problems,
    resolve_settings,
)

BOX = "\\boxed"


@pytest.fixture
def one_torch_thread():
    """Two OpenMP threads on a busy 2-core machine spin against each other; one is much faster here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from latentx.models import load_model

    return load_model("tiny")


def make_problems(answers):
    from latentx.tasks.benchmarks import Problem

    return [Problem(id=f"p{i}", problem=f"question {i}", answer=a) for i, a in enumerate(answers)]


# --- settings and protocols -------------------------------------------------------------------------


def test_sampling_settings_validation():
    assert SamplingSettings(n=16).ks == (1, 2, 4, 8, 16)
    assert SamplingSettings(n=4, ks=(4, 1, 1)).ks == (1, 4)
    for kwargs, field in [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n": 2, "ks": (3,)}, "ks"),
        ({"n": 2, "ks": ()}, "ks"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingSettings(**kwargs)


def test_protocol_presets():
    relax_math = resolve_settings("math500", "relax")
    assert (relax_math.n, relax_math.temperature, relax_math.ks) == (1, 0.0, (1,))
    relax_aime = resolve_settings("aime24", "relax")
    assert (relax_aime.n, relax_aime.temperature, relax_aime.top_p) == (32, 1.0, 1.0)
    assert resolve_settings("minerva_math", "relax").n == 1
    verl = {name: resolve_settings(name, "verl") for name in ("math500", "amc23", "aime25", "gsm8k")}
    assert [s.n for s in verl.values()] == [16, 128, 256, 16]
    assert all((s.temperature, s.top_p) == (0.6, 0.95) for s in verl.values())
    assert verl["aime25"].ks == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    plain = resolve_settings("anything")
    assert (plain.n, plain.temperature, plain.top_p, plain.max_new_tokens) == (1, 0.0, 1.0, 1024)


def test_explicit_options_override_protocol():
    s = resolve_settings("aime24", "verl", n=8, temperature=0.7, max_new_tokens=64)
    assert (s.n, s.temperature, s.top_p, s.max_new_tokens, s.ks) == (8, 0.7, 0.95, 64, (1, 2, 4, 8))
    with pytest.warns(UserWarning, match="dropping k > n"):
        s = resolve_settings("math500", "relax", ks=[1, 4])
    assert s.ks == (1,)
    with pytest.raises(ValueError, match="ks"):
        resolve_settings("math500", None, n=2, ks=[4])
    with pytest.raises(ValueError, match="ks"):
        resolve_settings("math500", None, ks=[1, 4])  # default n = 1
    with pytest.raises(ValueError, match="unknown protocol"):
        resolve_settings("math500", "deepseek")


# --- metrics plumbing with canned completions -------------------------------------------------------


def test_evaluate_problems_grades_and_aggregates():
    problems = make_problems(["2", "\\frac{1}{2}", "7"])
    canned = {
        "question 0": [f"{BOX}{{2}}", "3", f"{BOX}{{2}}", "no idea"],
        "question 1": ["The answer is 0.5.", f"{BOX}{{\\dfrac{{1}}{{2}}}}", f"{BOX}{{2}}", f"{BOX}{{1/3}}"],
        "question 2": ["8", "9", "10", "11"],
    }

    def generate(prompts, settings):
        assert settings.n == 4
        return [[Completion(text, 5, False) for text in canned[p.strip()]] for p in prompts]

    result = evaluate_problems(problems, SamplingSettings(n=4, temperature=1.0), generate, None,
                               template="{problem}", benchmark="toy", workers=1)
    assert [s.correct for s in result.samples] == [True, False, True, False, True, True, False, False] + [False] * 4
    assert [s.extracted for s in result.samples[:4]] == ["2", "3", "2", None]
    assert result.metrics["mean@4"] == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert result.metrics["pass@4"] == pytest.approx(2 / 3)
    assert result.metrics["pass@2"] == pytest.approx((1 - 1 / 6) * 2 / 3)  # 1 - C(2,2)/C(4,2) per solved problem
    summary = result.summary()
    assert summary["num_samples"] == 12 and summary["no_answer_fraction"] == pytest.approx(1 / 12)


def test_evaluate_problems_with_custom_grader_and_template():
    problems = make_problems(["x", "y"])
    seen = []

    def generate(prompts, settings):
        seen.extend(prompts)
        return [[Completion("ok", 1, False), Completion("bad", 1, False)] for _ in prompts]

    def grader(response, problem):
        return 1.0 if response == "ok" and problem.answer == "x" else 0.25  # a reward: >= 1 is correct

    result = evaluate_problems(problems, SamplingSettings(n=2, temperature=1.0), generate, None,
                               template=lambda p, tok: f"<{p.id}>", grader=grader)
    assert seen == ["<p0>", "<p1>"]
    assert [s.correct for s in result.samples] == [True, False, False, False]
    assert result.metrics == {"mean@2": 0.25, "pass@1": 0.25, "pass@2": 0.5}


def test_evaluate_problems_rejects_bad_input():
    def generate(prompts, settings):
        return [[Completion("1", 1, False)] for _ in prompts]

    with pytest.raises(ValueError, match="empty"):
        evaluate_problems([], SamplingSettings(), generate, None)
    with pytest.raises(ValueError, match="unique"):
        evaluate_problems(make_problems(["1"]) * 2, SamplingSettings(), generate, None, template="{problem}")
    with pytest.raises(RuntimeError, match="wrong number"):
        evaluate_problems(make_problems(["1"]), SamplingSettings(n=2, temperature=1.0), generate, None,
                          template="{problem}")


# --- generation with the tiny model -----------------------------------------------------------------


def test_generate_hf_is_seeded_batched_and_leaves_rng_alone(tiny, one_torch_thread):
    import torch

    from latentx.evaluate import generate_hf

    model, tokenizer = tiny
    prompts = ["1+1=", "a much longer prompt: 12*3=", "x"]
    sampled = SamplingSettings(n=2, temperature=1.0, max_new_tokens=6)
    state = torch.get_rng_state()
    first = generate_hf(model, tokenizer, prompts, sampled, batch_size=4, seed=3, progress=False)
    assert torch.equal(state, torch.get_rng_state())
    again = generate_hf(model, tokenizer, prompts, sampled, batch_size=4, seed=3, progress=False)
    assert first == again
    assert [len(row) for row in first] == [2, 2, 2]
    assert all(0 < c.num_tokens <= 6 for row in first for c in row)

    greedy = SamplingSettings(n=1, max_new_tokens=6)
    batched = generate_hf(model, tokenizer, prompts, greedy, batch_size=3, progress=False)
    single = [generate_hf(model, tokenizer, [p], greedy, batch_size=1, progress=False)[0] for p in prompts]
    assert [row[0].text for row in batched] == [row[0].text for row in single]  # left padding is masked

    with pytest.warns(UserWarning, match="greedy"):
        repeated = generate_hf(model, tokenizer, prompts[:1], SamplingSettings(n=3, max_new_tokens=4), progress=False)
    assert len(repeated[0]) == 3 and len({c.text for c in repeated[0]}) == 1
    assert not model.training


def test_evaluate_model_with_tiny_model(tiny, one_torch_thread):
    from latentx.evaluate import evaluate_model

    model, tokenizer = tiny
    result = evaluate_model(model, tokenizer, make_problems(["1", "2"]), n=2, ks=[1, 2], temperature=1.0,
                            max_new_tokens=5, template="plain", batch_size=4, progress=False,
                            grader=lambda response, problem: problem.id == "p0")
    assert result.metrics == {"mean@2": 0.5, "pass@1": 0.5, "pass@2": 0.5}
    assert {s.problem_id for s in result.samples} == {"p0", "p1"}


# --- the CLI end to end -----------------------------------------------------------------------------


def write_benchmark(path: Path) -> Path:
    rows = [
        {"question": "What is 1+1?", "answer": 2.0, "id": "a"},
        {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "id": "b"},
        {"question": "Eggs?", "answer": "3 + 4 = 7\n#### 7", "id": "c"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_eval_writes_results_and_regrades(tmp_path, one_torch_thread):
    from latentx.cli import app

    bench = write_benchmark(tmp_path / "toy.jsonl")
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, [
        "eval", "--model", "tiny", "--benchmarks", f"{bench}", "--n", "2", "--k", "1,2", "--temperature", "1.0",
        "--top-p", "0.95", "--max-new-tokens", "8", "--template", "plain", "--out", str(out), "--batch-size", "6",
        "--seed", "1", "--device", "cpu", "--workers", "1",
    ])
    assert result.exit_code == 0, result.output
    assert "toy" in result.output and "pass@2" in result.output

    summary = json.loads((out / "eval.json").read_text())
    entry = summary["benchmarks"]["toy"]
    assert summary["model"] == "tiny" and summary["template"] == "plain" and summary["backend"] == "hf"
    assert entry["num_problems"] == 3 and entry["num_samples"] == 6
    assert entry["settings"] == {"n": 2, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 8, "ks": [1, 2]}
    assert set(entry["metrics"]) == {"mean@2", "pass@1", "pass@2"}
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert [r["gold"] for r in rows] == ["2", "2", "\\frac{1}{2}", "\\frac{1}{2}", "7", "7"]
    assert all(set(r) >= {"response", "extracted", "correct", "num_tokens", "truncated"} for r in rows)
    correct_before = [r["correct"] for r in rows]
    assert entry["metrics"]["mean@2"] == pytest.approx(sum(correct_before) / 6)

    # Re-grade without generating: make problem "b" solved once and "a" solved twice.
    rows[0]["response"] = f"so {BOX}{{2}}"
    rows[1]["response"] = "The answer is 2."
    rows[2]["response"] = f"{BOX}{{0.5}}"
    rows[3]["response"] = f"{BOX}{{0.25}}"
    rows[4]["response"] = rows[5]["response"] = "no answer here"
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["eval", "--regrade", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    regraded = json.loads((out / "eval.json").read_text())
    metrics = regraded["benchmarks"]["toy"]["metrics"]
    assert metrics["mean@2"] == pytest.approx((2 / 2 + 1 / 2 + 0) / 3)
    assert metrics["pass@2"] == pytest.approx(2 / 3)
    assert "regraded" in regraded and regraded["model"] == "tiny"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, True, True, False, False, False]
    assert rows[1]["extracted"] == "2"


def test_cli_eval_errors_are_clear(tmp_path):
    from latentx.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--benchmarks", "math500"])
    assert result.exit_code == 2 and "--model is required" in result.output
    result = runner.invoke(app, ["eval", "--model", "tiny", "--k", "1,x"])
    assert result.exit_code == 2 and "--k must be comma-separated integers" in result.output
    result = runner.invoke(app, ["eval", "--regrade", str(tmp_path)])
    assert result.exit_code == 2 and "eval.json not found" in result.output
    result = runner.invoke(app, ["eval", "--model", "tiny", "--benchmarks", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "unknown benchmark" in result.output
    result = runner.invoke(app, ["eval", "--model", "tiny", "--protocol", "nope", "--benchmarks",
                                 str(write_benchmark(tmp_path / "b.jsonl"))])
    assert result.exit_code == 2 and "unknown protocol" in result.output
