"""Tasks: countdown reward and solutions, train/eval disjointness, the registry and TaskConfig."""

from __future__ import annotations

import random

import pytest

from latentx.models import build_char_tokenizer
from latentx.tasks import (
    CountdownTask,
    FunctionTask,
    Task,
    TaskConfig,
    TaskInstance,
    available_tasks,
    build_task,
    countdown_solutions,
    get_task,
    register_task,
    steps_to_expression,
)
from latentx.tasks import base as tasks_base


def cd(numbers, target, task=None):
    return TaskInstance("t", f"{' '.join(map(str, numbers))}>{target}:", "", {"numbers": list(numbers), "target": target})


@pytest.fixture(scope="module")
def countdown():
    return get_task("countdown")


@pytest.mark.parametrize(
    "response",
    [
        "3*5=15,15+7=22",
        "5*3=15,7+15=22",
        " 3 * 5 = 15 , 15 + 7 = 22 \n",
        "3*5+7",  # a plain expression is scored by the verifier directly
        "(7+3*5)",
    ],
)
def test_countdown_correct(countdown, response):
    assert countdown.reward(cd([3, 5, 7], 22), response) == 1.0
    assert countdown.is_correct(cd([3, 5, 7], 22), response)


@pytest.mark.parametrize(
    "response, why",
    [
        ("3*5=15,15+7=23", "wrong arithmetic in the last step"),
        ("3*5=16,16+6=22", "wrong arithmetic"),
        ("3*5=15,15+5=20", "wrong target and 5 used twice"),
        ("5+5=10,10+7=17", "5 used twice"),
        ("3*5=15,15+15=30", "intermediate used twice"),
        ("3*5=15", "not all numbers used"),
        ("15+7=22", "15 is not available"),
        ("3*5=15,15+7=22,22-0=22", "an extra step with an unavailable number"),
        ("3+5+7", "plain expression with the wrong value"),
        ("3*5+7+7", "plain expression using 7 twice"),
        ("", "empty"),
        ("   ", "blank"),
        ("3*5=15,,15+7=22", "empty step"),
        ("3*5=15;15+7=22 yes", "trailing text"),
        ("three times five", "words"),
        ("3*5=15,15+7=22=22", "double equals"),
        ("3**5", "power is not allowed"),
        ("__import__('os')", "code"),
        ("3*5=15,15+7", "incomplete step"),
        ("22", "just the target"),
    ],
)
def test_countdown_wrong_or_malformed(countdown, response, why):
    assert countdown.reward(cd([3, 5, 7], 22), response) == 0.0, why


def test_countdown_division_rules(countdown):
    # division by zero in a step (0 made from 4-4) scores 0 and raises nothing
    assert countdown.reward(cd([4, 4, 8], 8), "4-4=0,8/0=0") == 0.0
    assert countdown.reward(cd([4, 4, 8], 8), "8/(4-4)") == 0.0
    # inexact division: 7/2 is not an integer, so neither "=3" nor "=3.5" is a valid step
    assert countdown.reward(cd([7, 2, 4], 14), "7/2=3,3*4=12") == 0.0
    assert countdown.reward(cd([7, 2, 4], 14), "7/2=3.5,3.5*4=14") == 0.0
    # exact division is fine
    assert countdown.reward(cd([14, 9, 2], 63), "14/2=7,9*7=63") == 1.0
    # the verifier's own rules for plain expressions: 7/2*4 = 14 uses each number once
    assert countdown.reward(cd([7, 2, 4], 14), "7/2*4") == 1.0


def test_countdown_duplicate_numbers(countdown):
    assert countdown.reward(cd([3, 3, 6], 36), "3+3=6,6*6=36") == 1.0
    assert countdown.reward(cd([3, 3, 6], 12), "3+3=6,6+6=12") == 1.0
    assert countdown.reward(cd([3, 3, 6], 15), "3+6=9,9+6=15") == 0.0  # 6 used twice, a 3 unused


def test_countdown_negative_intermediate_follows_package_rules(countdown):
    # reasoning-gym allows any intermediate value; the step format accepts negative results too
    assert countdown.reward(cd([3, 9, 19], 13), "3-9=-6,-6+19=13") == 1.0


def test_steps_to_expression():
    assert steps_to_expression("3*5=15,15+7=22", [3, 5, 7]) == "((3*5)+7)"
    assert steps_to_expression("3*5=15,15+9=24", [3, 5, 7]) is None
    assert steps_to_expression("3-9=-6,-6+19=13", [3, 9, 19]) == "((3-9)+19)"


def test_countdown_solutions_are_correct_and_varied(countdown):
    solutions = countdown_solutions((3, 5, 7), 22)
    assert solutions == ("5*3=15,15+7=22",)  # larger operand first for + and *
    assert len(solutions) == len(set(solutions))
    instances = countdown.train_instances(40, seed=3)
    rng = random.Random(0)
    multi = 0
    for inst in instances:
        sols = countdown_solutions(tuple(sorted(inst.meta["numbers"])), inst.meta["target"])
        assert sols, inst
        assert all(countdown.reward(inst, s) == 1.0 for s in sols)
        drawn = {countdown.solution(inst, rng) for _ in range(30)}
        assert drawn <= set(sols)
        multi += len(drawn) > 1
    assert multi >= 10  # the warm start sees several solutions per problem, not one


def test_countdown_instances_deterministic_and_disjoint(countdown):
    train = countdown.train_instances(300, seed=0)
    assert train == countdown.train_instances(300, seed=0)
    assert train != countdown.train_instances(300, seed=1)
    key = lambda inst: (tuple(sorted(inst.meta["numbers"])), inst.meta["target"])  # noqa: E731
    train_keys = {key(i) for s in (0, 1) for i in countdown.train_instances(300, seed=s)}
    eval_keys = {key(i) for s in (0, 7) for i in countdown.eval_instances(60, seed=s)}
    assert len(eval_keys) > 30
    assert not train_keys & eval_keys
    inst = train[0]
    assert inst.prompt == f"{' '.join(map(str, inst.meta['numbers']))}>{inst.meta['target']}:"
    assert len(inst.meta["numbers"]) == 3 and all(1 <= n <= 20 for n in inst.meta["numbers"])


def test_countdown_four_operands_and_tokenizer_round_trip():
    task = get_task("countdown", num_operands=4, max_target=200)
    tokenizer = build_char_tokenizer()
    rng = random.Random(1)
    for inst in task.train_instances(5, seed=0):
        assert len(inst.meta["numbers"]) == 4
        text = task.format_prompt(inst, tokenizer) + task.solution(inst, rng)
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
        assert task.reward(inst, task.solution(inst, rng)) == 1.0


def test_countdown_question_style_uses_reasoning_gym_text():
    task = get_task("countdown", prompt_style="question")
    inst = task.train_instances(1, seed=0)[0]
    assert "Final answer format instructions" in inst.prompt
    numbers = inst.meta["numbers"]
    assert task.reward(inst, f"Let me think.\n{inst.answer}") == 1.0
    assert task.reward(inst, f"<answer>{inst.answer}</answer>") == 1.0
    assert task.reward(inst, "I give up") == 0.0
    assert numbers == task.train_instances(1, seed=0)[0].meta["numbers"]


@pytest.mark.parametrize(
    "options, field",
    [
        ({"num_operands": 7}, "task.options.num_operands"),
        ({"min_operands": 4, "max_operands": 3}, "min_operands"),
        ({"operators": "+^"}, "task.options.operators"),
        ({"max_value": 0}, "min_value / max_value"),
        ({"prompt_style": "verbose"}, "task.options.prompt_style"),
        ({"eval_fraction": 1.5}, "task.options.eval_fraction"),
    ],
)
def test_countdown_bad_options(options, field):
    with pytest.raises(ValueError, match=field):
        get_task("countdown", **options)
    with pytest.raises(ValueError, match=field):
        TaskConfig(name="countdown", options=options)


def test_task_config_and_build():
    cfg = TaskConfig()
    assert cfg.name == "countdown"
    assert isinstance(build_task(cfg), CountdownTask)
    with pytest.raises(ValueError, match="task.name must be one of"):
        TaskConfig(name="nope")
    with pytest.raises(ValueError, match="task.train_size"):
        TaskConfig(train_size=0)
    with pytest.raises(ValueError, match="unexpected keyword|bad options"):
        build_task(TaskConfig(options={"colour": "red"}))
    with pytest.raises(ValueError, match="math task"):
        TaskConfig(name="math")


@pytest.fixture
def clean_registry():
    saved = dict(tasks_base._REGISTRY)
    yield
    tasks_base._REGISTRY.clear()
    tasks_base._REGISTRY.update(saved)


def test_register_user_task_with_generator(clean_registry):
    def make(rng):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        return f"{a}+{b}=", str(a + b)

    register_task(
        "add",
        lambda **options: FunctionTask(
            "add",
            generate=make,
            reward_fn=lambda inst, response: float(response.strip() == inst.answer),
            solution_fn=lambda inst, rng: inst.answer,
            **options,
        ),
    )
    assert "add" in available_tasks()
    task = build_task(TaskConfig(name="add", options={"eval_fraction": 0.3}))
    train, held_out = task.train_instances(200, seed=0), task.eval_instances(50, seed=0)
    assert len(train) == 200 and len(held_out) == 50
    assert not {i.prompt for i in train} & {i.prompt for i in held_out}
    inst = train[0]
    assert task.reward(inst, task.solution(inst, random.Random(0))) == 1.0
    assert task.reward(inst, "nonsense") == 0.0
    with pytest.raises(ValueError, match="already registered"):
        register_task("add", task)


def test_register_user_task_instance_and_decorator(clean_registry):
    items = [(f"say {w}", w) for w in "cat dog owl emu yak elk ant bee cow pig hen fox rat bat eel".split()]

    def crashing_reward(inst, response):
        if response == "boom":
            raise RuntimeError("user reward failed")
        return 2.0 if response == inst.answer else float("nan")

    register_task("say", FunctionTask("say", reward_fn=crashing_reward, items=items, eval_fraction=0.3))
    task = get_task("say")
    held_out = task.eval_instances(100, seed=0)
    assert 0 < len(held_out) < 20 and len({i.prompt for i in held_out}) == len(held_out)
    assert not {i.prompt for i in task.train_instances(50, seed=0)} & {i.prompt for i in held_out}
    inst = held_out[0]
    assert task.reward(inst, inst.answer) == 1.0  # clipped to [0, 1]
    assert task.reward(inst, "boom") == 0.0  # a failing user reward scores 0
    assert task.reward(inst, "other") == 0.0  # NaN scores 0
    with pytest.raises(ValueError, match="takes no options"):
        get_task("say", eval_fraction=0.5)

    @register_task("const")
    class ConstTask(Task):
        name = "const"

        def _instances(self, n, seed, split):
            return [TaskInstance(f"{split}{i}", f"{split} {seed} {i}", "x") for i in range(n)]

        def reward(self, instance, response):
            return float(response == "x")

    assert get_task("const").is_correct(TaskInstance("a", "b", "x"), "x")


def test_function_task_validation():
    with pytest.raises(ValueError, match="exactly one of generate= or items="):
        FunctionTask("x", reward_fn=lambda i, r: 0.0)
    with pytest.raises(ValueError, match="item 1"):
        FunctionTask("x", reward_fn=lambda i, r: 0.0, items=[("a", "b"), 42])
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        get_task("countdown").train_instances(-1)


def test_format_prompt_plain_and_chat(countdown):
    inst = countdown.train_instances(1, seed=0)[0]
    tokenizer = build_char_tokenizer()
    assert countdown.format_prompt(inst, tokenizer) == inst.prompt

    class ChatTokenizer:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    chat_task = get_task("countdown", prompt_style="question")
    chat_inst = chat_task.train_instances(1, seed=0)[0]
    assert chat_task.format_prompt(chat_inst, ChatTokenizer()) == f"user:{chat_inst.prompt}|assistant:"
    assert chat_task.format_prompt(chat_inst, tokenizer) == chat_inst.prompt  # no template: plain
    forced = get_task("countdown", prompt_style="question", chat=True)
    with pytest.raises(ValueError, match="no chat template"):
        forced.format_prompt(chat_inst, tokenizer)
