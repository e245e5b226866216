"""Visual math problems (Geometry3K / MathVista / MathVerse-style files), graded by the math grader.

A JSONL / JSON / Parquet file with a problem, a reference answer and an image column, read like the
``math`` task (:class:`latentx.tasks.math_task.MathTask`: same schemas for problem and answer, same
split, grader and prompts).  The image column is ``image_key`` or the first of ``decoded_image``
(MathVista's decoded copy), ``images`` (Geometry3K / verl: a list), ``image``, ``image_path``; a cell
holds a file path (relative paths resolve against ``image_root``, default the data file's directory),
raw bytes, a ``{"bytes", "path"}`` struct (the Hugging Face ``Image`` feature in Parquet) or a list of
those.  ``<image>`` markers in the problem text place the images; otherwise they precede the text.

Every image is checked when the task is built: a missing or unreadable one is a one-line error naming
its row, as is a row with more images than ``<image>`` markers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from latentx.tasks.base import TaskInstance, register_task
from latentx.tasks.math_task import MathTask

__all__ = ["VMathTask", "IMAGE_KEYS"]

IMAGE_KEYS = ("decoded_image", "images", "image", "image_path", "img")


def _check_image(ref: Any, where: str, root: Path) -> Any:
    """``ref`` with a relative path made absolute, after checking that it opens as an image."""
    from PIL import Image, UnidentifiedImageError

    from latentx.vision import open_image

    if isinstance(ref, dict) and not ref.get("bytes") and ref.get("path"):
        ref = ref["path"]
    if isinstance(ref, str):
        path = Path(ref).expanduser()
        ref = str(path if path.is_absolute() else root / path)
        if not Path(ref).is_file():
            raise ValueError(f"{where}: image file {ref!r} not found")
        try:
            with Image.open(ref) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(f"{where}: image file {ref!r} is not a readable image ({error})") from None
        return ref
    open_image(ref, where=where)  # bytes / PIL: decode once to check
    return ref


class VMathTask(MathTask):
    """Math problems with images (see the module docstring); options as ``math`` plus ``image_key`` and
    ``image_root``."""

    name = "vmath"

    def __init__(self, path: str | None = None, image_key: str | None = None, image_root: str | None = None,
                 eval_path: str | None = None, **options) -> None:
        super().__init__(path=path, eval_path=eval_path, **options)
        self.image_key = image_key
        self.image_root = image_root
        digest = hashlib.sha256(self.problems_sha256.encode())
        for split, pool in self.pools.items():
            source = eval_path if split == "eval" and eval_path else path
            root = Path(image_root).expanduser() if image_root else Path(source).expanduser().resolve().parent
            checked = []
            for row, inst in enumerate(pool):
                where = f"vmath {source}: problem {inst.id} (row {row} of the {split} split)"
                refs = self._image_refs(inst, where)
                refs = [_check_image(ref, f"{where}", root) for ref in refs]
                markers = inst.prompt.count("<image>")
                if markers and markers != len(refs):
                    raise ValueError(f"{where}: {len(refs)} image(s) but {markers} <image> placeholder(s) in its problem")
                for ref in refs:
                    digest.update(str(ref).encode() if isinstance(ref, str) else _ref_bytes(ref))
                meta = {k: v for k, v in inst.meta.items() if k not in IMAGE_KEYS and k != image_key}
                checked.append(dataclasses.replace(inst, meta={**meta, "images": refs}))
            self.pools[split] = checked
        self.problems_sha256 = digest.hexdigest()  # the warm-start cache key covers the images too

    def _image_refs(self, inst: TaskInstance, where: str) -> list:
        keys = (self.image_key,) if self.image_key else IMAGE_KEYS
        for key in keys:
            value = inst.meta.get(key)
            if value is None or (isinstance(value, (list, tuple, str, bytes)) and len(value) == 0):
                continue
            return list(value) if isinstance(value, (list, tuple)) else [value]
        wanted = f"column {self.image_key!r}" if self.image_key else f"any of the columns {list(IMAGE_KEYS)}"
        raise ValueError(f"{where}: no image ({wanted} is missing or empty)")

    def format_prompt(self, instance: TaskInstance, tokenizer) -> str:
        from latentx.vision import format_vision_prompt

        use_chat = self.chat if self.chat is not None else bool(
            getattr(tokenizer, "chat_template", None)
            or getattr(getattr(tokenizer, "latentx_processor", None), "chat_template", None)
        )
        text = instance.prompt if use_chat else self.plain_template.replace("{problem}", instance.prompt)
        return format_vision_prompt(tokenizer, text, len(self.images(instance)), chat=use_chat,
                                    system=self.system_prompt, where=f"task 'vmath' problem {instance.id}")


def _ref_bytes(ref: Any) -> bytes:
    if isinstance(ref, dict):
        ref = ref.get("bytes") or b""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(ref)).digest()
    return repr(type(ref)).encode()


register_task("vmath", VMathTask)
