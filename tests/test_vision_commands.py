"""``latentx eval`` and ``latentx study`` with ``--model tiny-vl`` / ``vcountdown``: each works, or is a one-line
error naming the command (issue 13)."""

from __future__ import annotations

import io
import json

from PIL import Image
from typer.testing import CliRunner

from latentx.cli import app
from latentx.study import load_study_config, run_study
from latentx.trainer import Trainer


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_eval_runs_tiny_vl_on_a_text_benchmark(tmp_path):
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"problem": f"{k}+1?", "answer": str(k + 1)}) + "\n"
                                              for k in range(3)))
    result = CliRunner().invoke(app, ["eval", "--model", "tiny-vl", "--benchmarks", str(tmp_path / "b.jsonl"),
                                      "--max-new-tokens", "4", "--workers", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["model"] == "tiny-vl" and summary["benchmarks"]["b"]["num_problems"] == 3


def test_eval_refuses_image_benchmarks_and_tasks_in_one_line(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), "white").save(buffer, format="PNG")
    (tmp_path / "pic.png").write_bytes(buffer.getvalue())
    (tmp_path / "geo.jsonl").write_text(json.dumps({"problem": "<image> x?", "answer": "1", "image": "pic.png"}) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", "tiny-vl", "--benchmarks", str(tmp_path / "geo.jsonl"),
                                 "--out", str(tmp_path / "out")])
    _one_line_error(result, "latentx eval", "has images (column 'image'", "--task vmath")
    assert not (tmp_path / "out" / "eval.json").exists()
    # eval grades benchmarks, not training tasks: --task is typer's one-line usage error naming the command
    result = runner.invoke(app, ["eval", "--model", "tiny-vl", "--task", "vcountdown"])
    assert result.exit_code != 0 and "No such option: --task" in result.output and "eval --help" in result.output


def test_study_runs_on_tiny_vl_and_vcountdown(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "plot", lambda self: [])  # the per-run curves, not the study's plots
    base, study = load_study_config(None, [
        "steps=1", "model.name=tiny-vl", "task.name=vcountdown", "task.options.num_operands=2",
        "task.options.max_value=9", "task.train_size=32", "warm_start.steps=4", "warm_start.num_examples=16",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
        "relax.fit_batch_size=2", "relax.m=4", "eval.instances=4", "eval.n=2", "eval.ks=1,2",
        "study.objectives=grpo,relax", "study.seeds=1", "study.workers=1",
    ])
    results = run_study(base, study, tmp_path / "study", progress=False)
    assert results["settings"]["model"] == "tiny-vl" and results["settings"]["task"] == "vcountdown"
    for objective in ("grpo", "relax"):
        run = tmp_path / "study" / "runs" / objective / "s0"
        ev = json.loads((run / "study_eval.json").read_text())
        assert len(ev["correct_counts"]) == 4 and all(0 <= c <= 2 for c in ev["correct_counts"])
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 1 and metrics[0]["er_mean"] > 0
    assert "| relax |" in (tmp_path / "study" / "report.md").read_text()


def test_study_takes_the_model_through_its_config_and_names_itself_otherwise():
    result = CliRunner().invoke(app, ["study", "--model", "tiny-vl"])  # --set model.name=tiny-vl, as above
    assert result.exit_code != 0 and "No such option: --model" in result.output and "study --help" in result.output
