"""Tasks: prompts with a verifiable reward.

Built in: ``countdown`` (default; reasoning-gym's generator and verifier, step-by-step answers) and
``math`` (problems from a JSONL / Parquet file, graded by math-verify on the last ``\\boxed{}``), and two
tasks with images for vision-language models: ``vcountdown`` (countdown with the operands drawn into the
image) and ``vmath`` (Geometry3K / MathVista-style files with an image column).
Add your own with :func:`register_task` (see :mod:`latentx.tasks.base`).
"""

from latentx.tasks import base, countdown
from latentx.tasks.base import *  # noqa: F401,F403  (the task API, listed once in base.__all__)
from latentx.tasks.countdown import *  # noqa: F401,F403
from latentx.tasks.math_task import MathTask
from latentx.tasks.vcountdown import VCountdownTask
from latentx.tasks.vmath import VMathTask

__all__ = [*base.__all__, *countdown.__all__, "MathTask", "VCountdownTask", "VMathTask"]
