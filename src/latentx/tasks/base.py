"""What a task is: prompts with a verifiable reward.  Plus the registry and the task config.

A task hands out :class:`TaskInstance` s (``train_instances`` / ``eval_instances``, guaranteed disjoint),
turns one into the text the policy sees (``format_prompt``), and scores a response (``reward`` in
[0, 1], ``is_correct``).  ``solution`` gives a correct target completion for the supervised warm start
(``None`` when the task has none).

A task with images gives them per instance (:meth:`Task.images`: ``meta["images"]`` / ``meta["image"]``,
so a ``FunctionTask`` item ``{"prompt": ..., "answer": ..., "image": "cat.png"}`` is enough); the policy must
then be a vision-language model (``tiny-vl`` or any model with a ``vision_config``).

Add your own task in a few lines::

    from latentx.tasks import FunctionTask, TaskInstance, register_task

    def make(rng):                       # one random instance: (prompt, answer)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"{a}+{b}=", str(a + b)

    register_task("add", lambda **options: FunctionTask(
        "add", generate=make, reward_fn=lambda inst, response: float(response.strip() == inst.answer),
        solution_fn=lambda inst, rng: inst.answer, **options))

    task = get_task("add")               # or TaskConfig(name="add") in a training config
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = [
    "TaskInstance",
    "Task",
    "FunctionTask",
    "TaskConfig",
    "register_task",
    "get_task",
    "build_task",
    "available_tasks",
    "in_eval_split",
    "apply_chat_template",
]


@dataclass(frozen=True)
class TaskInstance:
    """One problem: ``prompt`` (raw, before any chat template), a reference ``answer``, free-form ``meta``."""

    id: str
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """Whether a problem belongs to the held-out split: a stable hash of its identity ``key``.

    Train and eval instances are filtered by this, so they are disjoint whatever the seeds and sizes.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def apply_chat_template(tokenizer, user: str, system: str | None = None) -> str:
    """Render one user turn (and an optional system prompt) with the tokenizer's chat template,
    ending with the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"task.options.chat is true but tokenizer {type(tokenizer).__name__} has no chat template"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class Task(ABC):
    """A source of prompts with a verifiable reward.

    Subclasses set ``name`` and implement ``_instances`` (or override ``train_instances`` and
    ``eval_instances``), ``reward`` and optionally ``solution``.  ``chat`` decides ``format_prompt``:
    ``False`` plain text, ``True`` the tokenizer's chat template, ``None`` the chat template when the
    tokenizer has one.
    """

    name: str = "task"
    chat: bool | None = None
    system_prompt: str | None = None

    def train_instances(self, n: int, seed: int = 0) -> list[TaskInstance]:
        """``n`` training instances, deterministic in ``seed``, never in the eval split."""
        return self._instances(_check_count(n), seed, split="train")

    def eval_instances(self, n: int, seed: int = 0) -> list[TaskInstance]:
        """``n`` held-out instances, deterministic in ``seed``, disjoint from every training set."""
        return self._instances(_check_count(n), seed, split="eval")

    @abstractmethod
    def _instances(self, n: int, seed: int, split: str) -> list[TaskInstance]:
        """``n`` instances of ``split`` (``"train"`` or ``"eval"``)."""

    @abstractmethod
    def reward(self, instance: TaskInstance, response: str) -> float:
        """Score in [0, 1] (1 = correct).  Must not raise on malformed responses."""

    def is_correct(self, instance: TaskInstance, response: str) -> bool:
        return self.reward(instance, response) >= 1.0

    def solution(self, instance: TaskInstance, rng: random.Random) -> str | None:
        """A correct completion for ``instance`` (drawn with ``rng`` when there are several), or None."""
        return None

    def images(self, instance: TaskInstance) -> list:
        """The images of ``instance`` (PIL images, file paths or bytes; see :func:`latentx.vision.open_image`):
        ``meta["images"]`` or ``[meta["image"]]``, none for a text-only task."""
        refs = instance.meta.get("images")
        if refs is None and instance.meta.get("image") is not None:
            refs = [instance.meta["image"]]
        if refs is None:
            return []
        return list(refs) if isinstance(refs, (list, tuple)) else [refs]

    def format_prompt(self, instance: TaskInstance, tokenizer) -> str:
        """The text the policy is conditioned on (the response follows it directly).  An instance with
        images gets the model's image placeholders (``<image>`` markers in its text place them)."""
        use_chat = self.chat if self.chat is not None else getattr(tokenizer, "chat_template", None) is not None
        images = self.images(instance)
        if images:
            from latentx.vision import format_vision_prompt

            return format_vision_prompt(tokenizer, instance.prompt, len(images), chat=bool(use_chat),
                                        system=self.system_prompt, where=f"task {self.name!r} instance {instance.id}")
        if use_chat:
            return apply_chat_template(tokenizer, instance.prompt, self.system_prompt)
        return instance.prompt


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return n


# --------------------------------------------------------------------------------------------------
# A task from plain functions
# --------------------------------------------------------------------------------------------------


def _as_instance(item: Any, index: int, name: str, split: str) -> TaskInstance:
    if isinstance(item, TaskInstance):
        return item
    if isinstance(item, dict):
        missing = {"prompt", "answer"} - set(item)
        if missing:
            raise ValueError(f"task {name!r}: item {index} lacks key(s) {sorted(missing)}")
        meta = {k: v for k, v in item.items() if k not in ("id", "prompt", "answer")}
        return TaskInstance(str(item.get("id", f"{name}/{split}/{index}")), str(item["prompt"]), str(item["answer"]), meta)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return TaskInstance(f"{name}/{split}/{index}", str(item[0]), str(item[1]), {})
    raise ValueError(
        f"task {name!r}: item {index} must be a TaskInstance, a (prompt, answer) pair or a dict with "
        f"'prompt' and 'answer', got {type(item).__name__}"
    )


class FunctionTask(Task):
    """A task assembled from functions: the easy way to add your own.

    Give exactly one source of problems:

    - ``generate(rng) -> (prompt, answer) | dict | TaskInstance``: a procedural generator, or
    - ``items``: a fixed list of ``(prompt, answer)`` pairs / dicts / instances.

    ``reward_fn(instance, response) -> float`` scores a response (clipped to [0, 1]; an exception
    scores 0).  ``solution_fn(instance, rng) -> str`` is optional (needed for the warm start).
    Problems are split into train / eval by a hash of the prompt (``eval_fraction`` of them held out).
    """

    def __init__(
        self,
        name: str,
        reward_fn: Callable[[TaskInstance, str], float],
        generate: Callable[[random.Random], Any] | None = None,
        items: Sequence[Any] | None = None,
        solution_fn: Callable[[TaskInstance, random.Random], str] | None = None,
        eval_fraction: float = 0.2,
        chat: bool | None = None,
        system_prompt: str | None = None,
        max_attempts_per_instance: int = 1000,
    ) -> None:
        if (generate is None) == (items is None):
            raise ValueError(f"task {name!r}: give exactly one of generate= or items=")
        if not callable(reward_fn):
            raise ValueError(f"task {name!r}: reward_fn must be callable")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"task.options.eval_fraction must lie in (0, 1), got {eval_fraction!r}")
        self.name = name
        self.reward_fn = reward_fn
        self.generate = generate
        self.solution_fn = solution_fn
        self.eval_fraction = eval_fraction
        self.chat = chat
        self.system_prompt = system_prompt
        self.max_attempts_per_instance = max_attempts_per_instance
        self.items: dict[str, list[TaskInstance]] | None = None
        if items is not None:
            instances = [_as_instance(item, i, name, "all") for i, item in enumerate(items)]
            self.items = {"train": [], "eval": []}
            for inst in instances:
                split = "eval" if in_eval_split(inst.prompt, eval_fraction) else "train"
                self.items[split].append(inst)

    def _instances(self, n: int, seed: int, split: str) -> list[TaskInstance]:
        rng = random.Random(f"{self.name}/{split}/{seed}")
        if self.items is not None:
            pool = self.items[split]
            if not pool and n:
                raise ValueError(f"task {self.name!r}: no {split} items (all fell in the other split)")
            if split == "eval":  # held-out: no repeats; at most the whole pool
                return rng.sample(pool, min(n, len(pool)))
            out: list[TaskInstance] = []
            while len(out) < n:  # train: reshuffled passes over the pool
                out.extend(rng.sample(pool, len(pool)))
            return out[:n]
        out = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > self.max_attempts_per_instance * max(n, 1):
                raise ValueError(f"task {self.name!r}: generator produced too few {split} instances")
            inst = _as_instance(self.generate(rng), len(out), self.name, split)
            if in_eval_split(inst.prompt, self.eval_fraction) == (split == "eval"):
                out.append(dataclasses.replace(inst, id=f"{self.name}/{split}/{seed}/{len(out)}"))
        return out

    def reward(self, instance: TaskInstance, response: str) -> float:
        try:
            value = float(self.reward_fn(instance, response))
        except Exception:  # noqa: BLE001 - a user reward that fails on junk output scores 0
            return 0.0
        if value != value:  # NaN
            return 0.0
        return min(1.0, max(0.0, value))

    def solution(self, instance: TaskInstance, rng: random.Random) -> str | None:
        return None if self.solution_fn is None else self.solution_fn(instance, rng)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str, task: Task | Callable[..., Task] | None = None, *, overwrite: bool = False):
    """Register a task under ``name``.

    ``task`` is a :class:`Task` instance (used as is, takes no options), or a factory / ``Task``
    subclass called as ``factory(**options)``.  Without ``task`` it is a decorator::

        @register_task("mytask")
        class MyTask(Task): ...
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"task name must be a non-empty string, got {name!r}")

    def add(entry: Task | Callable[..., Task]):
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"task {name!r} is already registered (pass overwrite=True to replace it)")
        if isinstance(entry, Task):
            instance = entry

            def factory(**options) -> Task:
                if options:
                    raise ValueError(f"task {name!r} was registered as an instance and takes no options, got {sorted(options)}")
                return instance

            _REGISTRY[name] = factory
        elif callable(entry):
            _REGISTRY[name] = entry
        else:
            raise ValueError(f"register_task({name!r}, ...) needs a Task, a Task subclass or a factory")
        return entry

    return add if task is None else add(task)


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **options) -> Task:
    """Build the registered task ``name`` with its ``options`` (e.g. ``get_task("countdown", num_operands=4)``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    factory = _REGISTRY[name]
    try:
        task = factory(**options)
    except TypeError as error:
        params = _option_names(factory)
        raise ValueError(f"task {name!r}: bad options {sorted(options)} ({error}); known: {params}") from error
    if not isinstance(task, Task):
        raise ValueError(f"task factory for {name!r} returned {type(task).__name__}, not a Task")
    return task


def _option_names(factory: Callable) -> list[str]:
    try:
        return [p for p in inspect.signature(factory).parameters if p not in ("self", "kwargs", "options")]
    except (TypeError, ValueError):
        return []


@dataclass
class TaskConfig:
    """Which task a run trains on.

    ``options`` go to the task's factory (e.g. ``{"num_operands": 4}`` for countdown, validated there);
    ``data_path`` is the problem file for file-backed tasks (``math``); ``train_size`` / ``eval_size``
    are the default pool sizes consumers draw.
    """

    name: str = "countdown"
    options: dict[str, Any] = field(default_factory=dict)
    data_path: str | None = None
    train_size: int = 2048
    eval_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"task.name must be a non-empty string, got {self.name!r}")
        if self.name not in _REGISTRY:
            raise ValueError(f"task.name must be one of {', '.join(available_tasks())}, got {self.name!r}")
        if not isinstance(self.options, dict):
            raise ValueError(f"task.options must be a mapping, got {self.options!r}")
        if self.data_path is not None and (not isinstance(self.data_path, str) or not self.data_path):
            raise ValueError(f"task.data_path must be a non-empty string or null, got {self.data_path!r}")
        for name in ("train_size", "eval_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"task.{name} must be a positive integer, got {value!r}")
        if "path" in self.options and self.data_path is not None:
            raise ValueError("give the task's data file once: task.data_path or task.options.path, not both")
        validate = getattr(_REGISTRY[self.name], "validate_options", None)
        if validate is not None:  # cheap checks now (e.g. countdown's numbers), not at the first step
            try:
                validate(**self.task_options())
            except (TypeError, ValueError) as error:
                message = str(error)
                raise ValueError(message if message.startswith("task") else f"task.options: {message}") from None

    def task_options(self) -> dict[str, Any]:
        options = dict(self.options)
        if self.data_path is not None:
            options["path"] = self.data_path
        return options


def build_task(cfg: TaskConfig) -> Task:
    """The :class:`Task` a :class:`TaskConfig` describes (option errors are prefixed ``task.options``)."""
    try:
        return get_task(cfg.name, **cfg.task_options())
    except ValueError as error:
        message = str(error)
        raise ValueError(message if message.startswith("task") else f"task.options: {message}") from error
