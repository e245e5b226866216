"""The math task on a real benchmark file and on hand-written files with malformed rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from latentx.models import build_char_tokenizer
from latentx.tasks import MathTask, TaskConfig, build_task, get_task

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
MATH500 = SHARED / "math500.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def small_file(tmp_path):
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(1, 8) for b in range(1, 6)]
    return write_jsonl(tmp_path / "sums.jsonl", rows)


def test_math_task_reward_on_boxed_answers(small_file):
    task = get_task("math", path=str(small_file), eval_fraction=0.3)
    inst = task.train_instances(1, seed=0)[0]
    a, b = (int(x) for x in inst.prompt.removeprefix("What is ").removesuffix("?").split(" + "))
    assert task.reward(inst, f"First {a}, then {b}. So \\boxed{{{a + b}}}.") == 1.0
    assert task.reward(inst, f"\\boxed{{{a + b + 1}}} no wait \\boxed{{{a + b}}}") == 1.0  # the last box counts
    assert task.reward(inst, f"\\boxed{{{a + b + 1}}}") == 0.0
    assert task.reward(inst, "I am not sure.") == 0.0
    assert task.reward(inst, "\\boxed{") == 0.0


def test_math_task_split_is_disjoint_and_deterministic(small_file):
    task = get_task("math", path=str(small_file), eval_fraction=0.3)
    held_out = task.eval_instances(100, seed=0)
    assert 0 < len(held_out) < 35 and len({i.id for i in held_out}) == len(held_out)
    train = task.train_instances(100, seed=0)  # more than the pool: reshuffled passes
    assert len(train) == 100
    assert not {i.prompt for i in train} & {i.prompt for i in held_out}
    assert train == task.train_instances(100, seed=0)


def test_math_task_eval_path_removes_overlap(small_file, tmp_path):
    held_out = write_jsonl(tmp_path / "held.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    task = get_task("math", path=str(small_file), eval_path=str(held_out))
    assert [i.prompt for i in task.eval_instances(5)] == ["What is 1 + 1?"]
    assert "What is 1 + 1?" not in {i.prompt for i in task.train_instances(200)}


def test_math_task_prompt_formats(small_file):
    task = get_task("math", path=str(small_file))
    inst = task.train_instances(1)[0]
    plain = task.format_prompt(inst, build_char_tokenizer())
    assert inst.prompt in plain and "\\boxed{}" in plain

    class ChatTokenizer:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return json.dumps(messages)

    messages = json.loads(task.format_prompt(inst, ChatTokenizer()))
    assert messages[0] == {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."}
    assert messages[1] == {"role": "user", "content": inst.prompt}


def test_math_task_malformed_rows(tmp_path):
    rows = [
        {"question": "What is 2 + 2?", "answer": "4"},
        "{not json",
        {"question": "What is 3 + 3?"},
        {"question": "What is 5 + 5?", "answer": "10"},
    ] + [{"question": f"What is {n} + 0?", "answer": str(n)} for n in range(20, 60)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"line 2.*line 3"):
        get_task("math", path=str(path))
    with pytest.warns(UserWarning, match="2 malformed"):
        task = build_task(TaskConfig(name="math", data_path=str(path), options={"on_error": "skip", "eval_fraction": 0.3}))
    prompts = {i.prompt for i in task.train_instances(200)} | {i.prompt for i in task.eval_instances(200)}
    assert "What is 3 + 3?" not in prompts and "What is 5 + 5?" in prompts


def test_math_task_config_errors(tmp_path):
    with pytest.raises(ValueError, match="task.data_path is required"):
        TaskConfig(name="math")
    with pytest.raises(ValueError, match="does not exist"):
        TaskConfig(name="math", data_path=str(tmp_path / "missing.jsonl"))
    existing = write_jsonl(tmp_path / "x.jsonl", [{"question": "1+1?", "answer": "2"}])
    with pytest.raises(ValueError, match="task.options.on_error"):
        TaskConfig(name="math", data_path=str(existing), options={"on_error": "ignore"})
    with pytest.raises(ValueError, match="task.options.eval_fraction"):
        TaskConfig(name="math", data_path=str(existing), options={"eval_fraction": 0})


@pytest.mark.skipif(not MATH500.is_file(), reason="shared benchmarks not available")
def test_math_task_on_math500_with_solutions():
    task = get_task("math", path=str(MATH500), limit=60, solution_key="solution")
    assert isinstance(task, MathTask)
    rng = random.Random(0)
    instances = task.train_instances(20)
    for inst in instances:
        solution = task.solution(inst, rng)
        assert solution is not None and task.reward(inst, solution) == 1.0, inst.id
    assert task.reward(instances[0], "The answer is \\boxed{definitely wrong}") == 0.0
