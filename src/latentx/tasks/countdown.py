"""Countdown: combine the given numbers with + - * / to reach a target (the default task).

Problems come from the ``reasoning-gym`` package's countdown generator and are scored by its own
verifier (``CountdownDataset.score_answer``): every given number used exactly once, the expression equal
to the target.  latentx adds a compact, step-by-step answer format for the tiny character-level model::

    prompt:   "3 5 7>22:"
    answer:   "3*5=15,15+7=22"

Each step ``a op b = c`` writes its intermediate result.  The reward parses the steps, checks that each
is arithmetically exact and only uses numbers still available (the given ones, or earlier results, each
once), assembles the equivalent expression (``((3*5)+7)``) and lets reasoning-gym's verifier decide.
Rules of the step format: results are integers written in full (``7/2=3.5`` is malformed); division
must be exact; a step may not divide by zero.  A response that is a plain arithmetic expression
(``3*5+7``) is scored by the verifier directly.  Anything malformed scores 0, never raises.

``prompt_style="question"`` uses reasoning-gym's own English question instead (for chat models).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import asdict, dataclass
from typing import Literal

from reasoning_gym.games.countdown import CountdownConfig as _RGConfig
from reasoning_gym.games.countdown import CountdownDataset as _RGDataset

from latentx.tasks.base import Task, TaskInstance, in_eval_split, register_task

__all__ = ["CountdownOptions", "CountdownTask", "countdown_solutions", "steps_to_expression"]

_STEP = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_STEP_SEPARATORS = re.compile(r"[,;\n]")
_EXPRESSION = re.compile(r"^[\d\s+\-*/()]+$")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_MAX_RESPONSE_CHARS = 400
_SEED_STRIDE = 1_000_003  # reasoning-gym seeds item idx with Random(seed + idx): keep seeds' streams apart


@dataclass
class CountdownOptions:
    """Countdown problem family.  ``num_operands`` (if given) sets both ``min_operands`` and ``max_operands``."""

    num_operands: int | None = None
    min_operands: int = 3
    max_operands: int = 3
    min_value: int = 1
    max_value: int = 20
    min_target: int = 1
    max_target: int = 100
    operators: str = "+-*/"
    prompt_style: Literal["compact", "question"] = "compact"
    chat: bool | None = None
    eval_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.num_operands is not None:
            if isinstance(self.num_operands, bool) or not isinstance(self.num_operands, int) or not 2 <= self.num_operands <= 5:
                raise ValueError(f"task.options.num_operands must be an integer from 2 to 5, got {self.num_operands!r}")
            self.min_operands = self.max_operands = self.num_operands
        for name in ("min_operands", "max_operands", "min_value", "max_value", "min_target", "max_target"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"task.options.{name} must be an integer, got {value!r}")
        if not 2 <= self.min_operands <= self.max_operands <= 5:
            raise ValueError(
                f"task.options.min_operands / max_operands must satisfy 2 <= min <= max <= 5, "
                f"got {self.min_operands} / {self.max_operands}"
            )
        if not 1 <= self.min_value <= self.max_value:
            raise ValueError(f"task.options.min_value / max_value must satisfy 1 <= min <= max, got {self.min_value} / {self.max_value}")
        if not 1 <= self.min_target <= self.max_target:
            raise ValueError(f"task.options.min_target / max_target must satisfy 1 <= min <= max, got {self.min_target} / {self.max_target}")
        if not isinstance(self.operators, str) or not self.operators or set(self.operators) - set("+-*/") or len(set(self.operators)) != len(self.operators):
            raise ValueError(f"task.options.operators must be distinct characters from '+-*/', got {self.operators!r}")
        if self.prompt_style not in ("compact", "question"):
            raise ValueError(f"task.options.prompt_style must be 'compact' or 'question', got {self.prompt_style!r}")
        if self.chat is not None and not isinstance(self.chat, bool):
            raise ValueError(f"task.options.chat must be true, false or null, got {self.chat!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"task.options.eval_fraction must lie in (0, 1), got {self.eval_fraction!r}")


def _apply(op: str, a: int, b: int) -> int | None:
    """``a op b`` when it is an integer (exact division, no division by zero), else None."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0 or a % b != 0:
        return None
    return a // b


@functools.lru_cache(maxsize=65536)
def countdown_solutions(numbers: tuple[int, ...], target: int, operators: str = "+-*/") -> tuple[str, ...]:
    """Every step-format solution that uses all ``numbers`` once and whose intermediate results are
    non-negative integers (brute force; fine up to 5 numbers).  ``+`` and ``*`` write the larger operand
    first, so commuted duplicates are not listed twice.  Sorted, so the result is deterministic."""
    found: set[str] = set()

    def search(pool: tuple[int, ...], steps: tuple[str, ...]) -> None:
        if len(pool) == 1:
            if pool[0] == target:
                found.add(",".join(steps))
            return
        for i, a in enumerate(pool):
            for j, b in enumerate(pool):
                if i == j:
                    continue
                rest = pool[:min(i, j)] + pool[min(i, j) + 1:max(i, j)] + pool[max(i, j) + 1:]
                for op in operators:
                    if op in "+*" and (a < b or (a == b and i > j)):
                        continue
                    result = _apply(op, a, b)
                    if result is None or result < 0:
                        continue
                    search(rest + (result,), steps + (f"{a}{op}{b}={result}",))

    search(tuple(numbers), ())
    return tuple(sorted(found))


def steps_to_expression(text: str, numbers: list[int]) -> str | None:
    """The expression a step-format answer computes (``"3*5=15,15+7=22"`` -> ``"((3*5)+7)"``), or None
    when a step is malformed, arithmetically wrong, divides by zero / inexactly, or uses a number that is
    not available (given numbers and earlier results, each usable once).  Unused numbers are allowed
    here; the verifier rejects them."""
    pool: list[tuple[int, str]] = [(n, str(n)) for n in numbers]

    def take(value: int) -> str | None:
        for k, (v, expression) in enumerate(pool):
            if v == value:
                del pool[k]
                return expression
        return None

    parts = [p for p in _STEP_SEPARATORS.split(text.strip())]
    if not parts or any(not p.strip() for p in parts):
        return None
    last = None
    for part in parts:
        match = _STEP.match(part)
        if match is None:
            return None
        a, op, b, claimed = int(match[1]), match[2], int(match[3]), int(match[4])
        if _apply(op, a, b) != claimed:
            return None
        left = take(a)
        right = take(b) if left is not None else None
        if left is None or right is None:
            return None
        last = f"({left}{op}{right})"
        pool.append((claimed, last))
    return last


class CountdownTask(Task):
    """The countdown task (see the module docstring); options are :class:`CountdownOptions` fields."""

    name = "countdown"

    def __init__(self, **options) -> None:
        self.options = CountdownOptions(**options)
        self.chat = self.options.chat if self.options.prompt_style == "question" else (self.options.chat or False)
        self._verifier = _RGDataset(self._rg_config(seed=0))

    @classmethod
    def validate_options(cls, **options) -> None:
        CountdownOptions(**options)

    def _rg_config(self, seed: int) -> _RGConfig:
        o = self.options
        return _RGConfig(
            min_numbers=o.min_operands, max_numbers=o.max_operands, min_value=o.min_value, max_value=o.max_value,
            min_target=o.min_target, max_target=o.max_target, operators=tuple(o.operators), shuffle=True,
            seed=seed, size=2**31 - 1,
        )

    def _instances(self, n: int, seed: int, split: str) -> list[TaskInstance]:
        return list(self._cached_instances(n, seed, split))

    @functools.lru_cache(maxsize=32)
    def _cached_instances(self, n: int, seed: int, split: str) -> tuple[TaskInstance, ...]:
        dataset = _RGDataset(self._rg_config(seed=(seed * _SEED_STRIDE) % 2**31))
        out: list[TaskInstance] = []
        idx = failures = 0
        while len(out) < n:
            if idx > 200 * n + 1000:
                raise ValueError(
                    f"countdown: could not generate {n} {split} instances with options {asdict(self.options)} "
                    f"({failures} generator failures); widen min_target..max_target"
                )
            try:
                item = dataset[idx]
            except ValueError:  # reasoning-gym found no expression in the target range for this idx
                failures += 1
                idx += 1
                continue
            idx += 1
            numbers, target = list(item["metadata"]["numbers"]), int(item["metadata"]["target"])
            key = f"{sorted(numbers)}>{target}"
            if in_eval_split(key, self.options.eval_fraction) != (split == "eval"):
                continue
            if not countdown_solutions(tuple(sorted(numbers)), target, self.options.operators):
                continue  # only reachable with negative intermediates: no step-format solution to learn
            if self.options.prompt_style == "compact":
                prompt = f"{' '.join(map(str, numbers))}>{target}:"
            else:
                prompt = item["question"]
            meta = {"numbers": numbers, "target": target, "split": split, "source_index": idx - 1}
            out.append(TaskInstance(f"countdown/{split}/{seed}/{len(out)}", prompt, item["answer"], meta))
        return tuple(out)

    def _extract(self, response: str) -> str:
        text = response.strip()
        if self.options.prompt_style == "question":
            tagged = _ANSWER_TAG.findall(text)
            if tagged:
                text = tagged[-1].strip()
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            text = lines[-1].strip("`$ .") if lines else ""
        return text

    def reward(self, instance: TaskInstance, response: str) -> float:
        if not isinstance(response, str) or len(response) > _MAX_RESPONSE_CHARS:
            return 0.0
        text = self._extract(response)
        if not text:
            return 0.0
        numbers = instance.meta["numbers"]
        if "=" in text:
            expression = steps_to_expression(text, numbers)
        elif _EXPRESSION.match(text) and "**" not in text and "//" not in text:
            expression = text
        else:
            expression = None
        if expression is None:
            return 0.0
        entry = {"metadata": {"numbers": numbers, "target": instance.meta["target"]}}
        try:
            score = self._verifier.score_answer(expression, entry)
        except Exception:  # noqa: BLE001 - the verifier should not raise, but malformed output must score 0
            return 0.0
        return 1.0 if score >= 1.0 else 0.0

    def solution(self, instance: TaskInstance, rng: random.Random) -> str | None:
        """A step-format solution drawn uniformly from all of them (see :func:`countdown_solutions`)."""
        numbers, target = instance.meta["numbers"], instance.meta["target"]
        solutions = countdown_solutions(tuple(sorted(numbers)), target, self.options.operators)
        return rng.choice(solutions) if solutions else None


register_task("countdown", CountdownTask)
