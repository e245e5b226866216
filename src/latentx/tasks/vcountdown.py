"""Visual countdown: the operands are only in the image, the target is in the text.

Each instance is a countdown problem (:mod:`latentx.tasks.countdown`: same generator, split and
verifier) whose numbers are drawn into one image, one ``cell`` x ``cell`` pixel square per number
(28 px = one image token of ``tiny-vl`` after Qwen's 2 x 2 patch merge).  The answer transcribes the
numbers, then solves::

    image:    | 14 |  9 |  2 |
    prompt:   ">63:"  (the model's image placeholder goes in front)
    answer:   "14 9 2|14/2=7,9*7=63"

The reward is countdown's verifier on the part after the first ``|`` (the whole response when it has
none); with ``require_transcription`` the part before ``|`` must also list the image's numbers in order.
``blind=True`` draws empty images: the image-blind control, which can only guess the operands.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass

from latentx.tasks.base import Task, TaskInstance, register_task
from latentx.tasks.countdown import CountdownTask

__all__ = ["VCountdownTask", "render_numbers"]

_TRANSCRIPT_SEPARATOR = "|"


@functools.lru_cache(maxsize=8192)
def render_numbers(numbers: tuple[int, ...], cell: int = 28, blind: bool = False):
    """``numbers`` drawn left to right in black on white, one ``cell``-pixel square each (PIL RGB).
    With ``blind`` the image is blank (same size)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (cell * len(numbers), cell), "white")
    if blind:
        return image
    draw = ImageDraw.Draw(image)
    font = _font(max(6, int(cell * 0.6)))
    for i, number in enumerate(numbers):
        text = str(number)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = i * cell + (cell - (right - left)) / 2 - left
        y = (cell - (bottom - top)) / 2 - top
        draw.text((x, y), text, fill="black", font=font)
    return image


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):  # pragma: no cover - Pillow built without FreeType
        return ImageFont.load_default()


@dataclass
class _VisualOptions:
    require_transcription: bool = False
    blind: bool = False
    cell: int = 28

    def __post_init__(self) -> None:
        for name in ("require_transcription", "blind"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"task.options.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.cell, bool) or not isinstance(self.cell, int) or not 14 <= self.cell <= 112:
            raise ValueError(f"task.options.cell must be an integer from 14 to 112 pixels, got {self.cell!r}")


class VCountdownTask(Task):
    """Countdown with the operands rendered into the image (see the module docstring).

    Options: ``require_transcription``, ``blind``, ``cell`` and every :class:`CountdownOptions` field
    except ``prompt_style`` (the compact format only).
    """

    name = "vcountdown"

    def __init__(self, require_transcription: bool = False, blind: bool = False, cell: int = 28, **options) -> None:
        self.visual = _VisualOptions(require_transcription, blind, cell)
        if options.get("prompt_style", "compact") != "compact":
            raise ValueError("task.options.prompt_style: vcountdown has the compact format only")
        self.countdown = CountdownTask(**options)
        self.options = self.countdown.options
        self.chat = self.options.chat or False

    @classmethod
    def validate_options(cls, require_transcription: bool = False, blind: bool = False, cell: int = 28, **options) -> None:
        _VisualOptions(require_transcription, blind, cell)
        if options.get("prompt_style", "compact") != "compact":
            raise ValueError("task.options.prompt_style: vcountdown has the compact format only")
        CountdownTask.validate_options(**options)

    def _instances(self, n: int, seed: int, split: str) -> list[TaskInstance]:
        out = []
        for inst in self.countdown._instances(n, seed, split):
            target = inst.meta["target"]
            out.append(dataclasses.replace(
                inst, id=inst.id.replace("countdown/", "vcountdown/", 1), prompt=f">{target}:",
            ))
        return out

    def images(self, instance: TaskInstance) -> list:
        return [render_numbers(tuple(instance.meta["numbers"]), self.visual.cell, self.visual.blind)]

    @staticmethod
    def split_response(response: str) -> tuple[str | None, str]:
        """``(transcription, solution)``: the parts before / after the first ``|`` (None when absent)."""
        if _TRANSCRIPT_SEPARATOR not in response:
            return None, response
        head, tail = response.split(_TRANSCRIPT_SEPARATOR, 1)
        return head, tail

    def transcription_correct(self, instance: TaskInstance, response: str) -> bool:
        """Whether the response's transcription lists the image's numbers, in order."""
        head, _ = self.split_response(response if isinstance(response, str) else "")
        if head is None:
            return False
        return head.split() == [str(n) for n in instance.meta["numbers"]]

    def reward(self, instance: TaskInstance, response: str) -> float:
        if not isinstance(response, str):
            return 0.0
        head, tail = self.split_response(response)
        if self.visual.require_transcription and not self.transcription_correct(instance, response):
            return 0.0
        return self.countdown.reward(instance, tail)

    def solution(self, instance: TaskInstance, rng: random.Random) -> str | None:
        steps = self.countdown.solution(instance, rng)
        if steps is None:
            return None
        return " ".join(map(str, instance.meta["numbers"])) + _TRANSCRIPT_SEPARATOR + steps


register_task("vcountdown", VCountdownTask)
