"""Math word problems from a JSONL / Parquet file, rewarded by the symbolic grader on the last ``\\boxed{}``.

Problems are read with :func:`latentx.tasks.benchmarks.load_benchmark` (any of the shared benchmark
schemas, or ``problem_key`` / ``answer_key`` for your own file; malformed rows are reported with their
line numbers and are fatal, or skipped with ``on_error="skip"``).  The reward is
:func:`latentx.tasks.grading.grade_answer` (math-verify, with a time limit).

Prompt: with a chat template (``chat=True``, or ``None`` and the tokenizer has one) the system prompt
is "Please reason step by step, and put your final answer within \\boxed{}." and the user turn is the
problem; without one, ``plain_template`` is filled in with the problem.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Literal

from latentx.tasks.base import Task, TaskInstance, in_eval_split, register_task

__all__ = ["MathTask", "BOXED_INSTRUCTION", "PLAIN_TEMPLATE"]

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Question: {problem}\n" + BOXED_INSTRUCTION + "\nAnswer:"


def _load(path: str, problem_key: str | None, answer_key: str | None, limit: int | None, on_error: str) -> list[TaskInstance]:
    from latentx.tasks.benchmarks import load_benchmark  # written by the eval engineer; imported on use

    benchmark = load_benchmark(path, problem_key=problem_key, answer_key=answer_key, limit=limit, on_error=on_error)
    return [
        TaskInstance(f"{benchmark.name}/{p.id}", p.problem, str(p.answer), dict(p.meta or {}))
        for p in benchmark.problems
    ]


class MathTask(Task):
    """Problems from ``path``; held out: ``eval_path`` if given (its problems are removed from training),
    else a stable ``eval_fraction`` of ``path`` chosen by a hash of the problem text."""

    name = "math"

    def __init__(
        self,
        path: str | None = None,
        problem_key: str | None = None,
        answer_key: str | None = None,
        limit: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        eval_path: str | None = None,
        eval_fraction: float = 0.1,
        chat: bool | None = None,
        system_prompt: str = BOXED_INSTRUCTION,
        plain_template: str = PLAIN_TEMPLATE,
        solution_key: str | None = None,
        grade_timeout: float = 5.0,
    ) -> None:
        self.validate_options(path=path, limit=limit, on_error=on_error, eval_path=eval_path,
                              eval_fraction=eval_fraction, plain_template=plain_template, grade_timeout=grade_timeout)
        self.path, self.eval_path, self.eval_fraction = path, eval_path, eval_fraction
        self.problem_key, self.answer_key, self.limit = problem_key, answer_key, limit
        self.chat = chat
        self.system_prompt = system_prompt
        self.plain_template = plain_template
        self.solution_key = solution_key
        self.grade_timeout = float(grade_timeout)
        problems = _load(path, problem_key, answer_key, limit, on_error)
        if eval_path is not None:
            held_out = _load(eval_path, problem_key, answer_key, None, on_error)
            held_out_texts = {inst.prompt.strip() for inst in held_out}
            self.pools = {"train": [p for p in problems if p.prompt.strip() not in held_out_texts], "eval": held_out}
        else:
            self.pools = {"train": [], "eval": []}
            for inst in problems:
                self.pools["eval" if in_eval_split(inst.prompt.strip(), eval_fraction) else "train"].append(inst)
        content = json.dumps([[i.prompt, i.answer] for split in ("train", "eval") for i in self.pools[split]])
        self.problems_sha256 = hashlib.sha256(content.encode()).hexdigest()  # identity for the warm-start cache
        for split, pool in self.pools.items():
            if not pool:
                raise ValueError(f"task.options: the math task has no {split} problems (file {eval_path if split == 'eval' and eval_path else path})")

    @classmethod
    def validate_options(cls, path: str | None = None, limit: int | None = None, on_error: str = "raise",
                         eval_path: str | None = None, eval_fraction: float = 0.1,
                         plain_template: str = PLAIN_TEMPLATE, grade_timeout: float = 5.0, **_: object) -> None:
        if not path:
            raise ValueError("task.data_path is required for the math task (a JSONL or Parquet file)")
        for name, value in (("data_path", path), ("options.eval_path", eval_path)):
            # a bare benchmark name (e.g. "math500") is resolved by load_benchmark; a path must exist
            looks_like_path = value is not None and ("/" in value or value.endswith((".jsonl", ".json", ".parquet")))
            if looks_like_path and not Path(value).expanduser().exists():
                raise ValueError(f"task.{name}: file {value} does not exist")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"task.options.limit must be a positive integer or null, got {limit!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"task.options.on_error must be 'raise' or 'skip', got {on_error!r}")
        if not isinstance(eval_fraction, (int, float)) or not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"task.options.eval_fraction must lie in (0, 1), got {eval_fraction!r}")
        if "{problem}" not in plain_template:
            raise ValueError("task.options.plain_template must contain '{problem}'")
        if not grade_timeout > 0:
            raise ValueError(f"task.options.grade_timeout must be > 0, got {grade_timeout!r}")

    def _instances(self, n: int, seed: int, split: str) -> list[TaskInstance]:
        pool = self.pools[split]
        rng = random.Random(f"math/{split}/{seed}")
        if split == "eval":  # no repeats; at most the whole held-out set
            return rng.sample(pool, min(n, len(pool)))
        out: list[TaskInstance] = []
        while len(out) < n:
            out.extend(rng.sample(pool, len(pool)))
        return out[:n]

    def format_prompt(self, instance: TaskInstance, tokenizer) -> str:
        use_chat = self.chat if self.chat is not None else getattr(tokenizer, "chat_template", None) is not None
        if use_chat:
            return super().format_prompt(instance, tokenizer)
        return self.plain_template.replace("{problem}", instance.prompt)

    def reward(self, instance: TaskInstance, response: str) -> float:
        return self.score(response, instance.answer, self.grade_timeout)

    @staticmethod
    def score(response: str, answer: str, timeout: float = 5.0) -> float:
        """The reward of ``response`` against the reference ``answer`` alone: 1.0 if the grader accepts it
        within ``timeout`` seconds, else 0.0 (what every math-family task rewards; also verl's reward)."""
        from latentx.tasks.grading import grade_answer

        try:
            return 1.0 if grade_answer(response, answer, timeout=timeout) else 0.0
        except Exception:  # noqa: BLE001 - a response the grader chokes on is simply wrong
            return 0.0

    def solution(self, instance: TaskInstance, rng: random.Random) -> str | None:
        """The worked solution stored under ``solution_key`` (ending in ``\\boxed{answer}``), else None."""
        if self.solution_key is None:
            return None
        text = instance.meta.get(self.solution_key)
        if not isinstance(text, str) or not text.strip():
            return None
        if "\\boxed" not in text:
            text = f"{text.rstrip()}\nThe final answer is \\boxed{{{instance.answer}}}."
        return text


register_task("math", MathTask)
