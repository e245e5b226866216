"""latentx tasks as verl Parquet rows (``latentx.integrations.verl.data``, examples/verl/vl_data.py) and the verl
reward function that grades them: its scores equal the task's own reward.  Needs no verl (the reading by verl's
RLHFDataset is tested in tests/test_integration_verl_vl.py)."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

from latentx.integrations.verl.data import compute_score, verl_rows, write_parquet
from latentx.tasks import get_task

REPO = Path(__file__).resolve().parents[1]


def _read(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_vcountdown_rows_carry_the_image_and_grade_like_the_task(tmp_path):
    options = {"min_operands": 2, "max_operands": 3, "require_transcription": True}
    task = get_task("vcountdown", **options)
    instances = task.train_instances(6)
    rows = _read(write_parquet(verl_rows(task, "vcountdown", options, instances, "train", system="S"), tmp_path / "t.parquet"))
    assert len(rows) == 6
    rng = random.Random(0)
    for row, inst in zip(rows, instances):
        assert row["data_source"] == "latentx/vcountdown"
        assert row["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": f"<image>{inst.prompt}"}]
        (image,) = row["images"]
        assert image["path"] is None
        assert Image.open(io.BytesIO(image["bytes"])).convert("RGB").tobytes() == task.images(inst)[0].tobytes()
        args = dict(data_source=row["data_source"], ground_truth=row["reward_model"]["ground_truth"],
                    extra_info=row["extra_info"])
        right = task.solution(inst, rng)
        wrong_transcription = "0 " + right  # right steps, wrong numbers before '|'
        for response in (right, wrong_transcription, right.split("|")[1], "1+1=2", ""):
            assert compute_score(solution_str=response, **args) == task.reward(inst, response)
        assert compute_score(solution_str=right, **args) == 1.0
        assert compute_score(solution_str=wrong_transcription, **args) == 0.0


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 28), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_vmath_rows_place_every_image_and_grade_with_the_math_grader(tmp_path):
    for k in range(10):
        (tmp_path / f"a{k}.png").write_bytes(_png((20 * k, 0, 0)))
    problems = [{"problem": f"In <image> and <image>, x = {k}. Find x.", "answer": str(k),
                 "images": [f"a{k}.png", f"a{(k + 1) % 10}.png"]} for k in range(10)]
    (tmp_path / "geo.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    options = {"path": str(tmp_path / "geo.jsonl"), "eval_fraction": 0.3}
    task = get_task("vmath", **options)
    instances = task.train_instances(4)
    rows = _read(write_parquet(verl_rows(task, "vmath", options, instances, "train"), tmp_path / "v.parquet"))
    for row, inst in zip(rows, instances):
        assert row["prompt"][0] == {"role": "system", "content": task.system_prompt}
        assert row["prompt"][1]["content"] == inst.prompt and inst.prompt.count("<image>") == 2
        assert [r["bytes"] for r in row["images"]] == [(tmp_path / p).read_bytes() for p in inst.meta["images"]]
        assert json.loads(row["extra_info"]["latentx"])["grader"] == "math"  # no data file needed to grade
        args = dict(data_source="latentx/vmath", ground_truth=row["reward_model"]["ground_truth"], extra_info=row["extra_info"])
        for response in (f"so \\boxed{{{inst.answer}}}", "\\boxed{-1}", "no box"):
            assert compute_score(solution_str=response, **args) == task.reward(inst, response)
        assert compute_score(solution_str=f"\\boxed{{{inst.answer}}}", **args) == 1.0


def test_compute_score_names_a_row_without_the_spec():
    with pytest.raises(ValueError, match="openai/gsm8k.*extra_info.latentx"):
        compute_score("openai/gsm8k", "42", "42", {"index": 0})


def test_vl_data_script_writes_train_and_test(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vl_data_example", REPO / "examples" / "verl" / "vl_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.main(["--task", "vcountdown", "--options", '{"min_operands": 2, "max_operands": 2}',
                 "--train-size", "5", "--test-size", "3", "--out", str(tmp_path)])
    train, test = _read(tmp_path / "train.parquet"), _read(tmp_path / "test.parquet")
    assert len(train) == 5 and len(test) == 3
    assert train[0]["prompt"][0]["content"] == module.VCOUNTDOWN_SYSTEM
    assert {row["extra_info"]["split"] for row in test} == {"test"}
