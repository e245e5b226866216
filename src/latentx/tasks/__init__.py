"""Tasks: prompts with a verifiable reward.

Built in: ``countdown`` (default; reasoning-gym's generator and verifier, step-by-step answers) and
``math`` (problems from a JSONL / Parquet file, graded by math-verify on the last ``\\boxed{}``), and two
tasks with images for vision-language models: ``vcountdown`` (countdown with the operands drawn into the
image) and ``vmath`` (Geometry3K / MathVista-style files with an image column).
Add your own with :func:`register_task` (see :mod:`latentx.tasks.base`).
"""

from latentx.tasks.base import (
    FunctionTask,
    Task,
    TaskConfig,
    TaskInstance,
    apply_chat_template,
    available_tasks,
    build_task,
    get_task,
    in_eval_split,
    register_task,
)
from latentx.tasks.countdown import CountdownOptions, CountdownTask, countdown_solutions, steps_to_expression
from latentx.tasks.math_task import MathTask
from latentx.tasks.vcountdown import VCountdownTask
from latentx.tasks.vmath import VMathTask

__all__ = [
    "Task",
    "TaskInstance",
    "TaskConfig",
    "FunctionTask",
    "register_task",
    "get_task",
    "build_task",
    "available_tasks",
    "in_eval_split",
    "apply_chat_template",
    "CountdownTask",
    "CountdownOptions",
    "countdown_solutions",
    "steps_to_expression",
    "MathTask",
    "VCountdownTask",
    "VMathTask",
]
