"""latentx tasks as verl data, and the verl reward function that grades them with latentx's verifiers.

Rows follow the schema verl 0.9.1's ``RLHFDataset`` reads (``verl/utils/dataset/rl_dataset.py``:
``prompt_key="prompt"``, ``image_key="images"``, ``_build_messages`` / ``__getitem__``):

- ``data_source``: ``"latentx/<task>"``;
- ``prompt``: chat messages, an optional system turn and one user turn whose text holds one ``<image>``
  marker per image (``_build_messages`` splits the text at the markers and fills them, in order, from
  ``images``); a problem without markers gets its images before the text (:func:`latentx.vision.vision_content`);
- ``images``: a list of ``{"bytes": PNG, "path": None}`` (the Hugging Face ``Image`` feature's Parquet
  layout, which ``_build_messages`` opens from the bytes), so the file needs no image directory;
- ``ability``, ``reward_model = {"style": "rule", "ground_truth": answer}``;
- ``extra_info = {"index", "split", "latentx"}``, ``latentx`` a JSON grader spec read by :func:`compute_score`.

The reward: ``reward.custom_reward_function.path=pkg://latentx.integrations.verl.data`` and
``...name=compute_score`` (verl's ``get_custom_reward_fn``; its reward manager calls
``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)``).  Math-family tasks (``math``,
``vmath``) are graded by :meth:`latentx.tasks.math_task.MathTask.score` against ``ground_truth`` alone (no
data file is needed on the reward workers); every other task is rebuilt from its options and its own
``reward`` runs on the rebuilt instance (``vcountdown``: countdown's verifier after ``|``, and the
transcription with ``require_transcription``).  This module imports neither verl nor Ray.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["DATA_SOURCE_PREFIX", "IMAGE_KEY", "REWARD_FUNCTION_PATH", "verl_rows", "write_parquet", "compute_score"]

DATA_SOURCE_PREFIX = "latentx/"
#: ``data.image_key`` of a run on these rows (verl's default).
IMAGE_KEY = "images"
#: ``reward.custom_reward_function.path`` of a run on these rows (with ``name=compute_score``).
REWARD_FUNCTION_PATH = "pkg://latentx.integrations.verl.data"


def _png(ref: Any, where: str) -> dict:
    from latentx.vision import open_image

    buffer = io.BytesIO()
    open_image(ref, where=where).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _grader_spec(task, task_name: str, options: dict, instance) -> dict:
    from latentx.tasks.math_task import MathTask

    if isinstance(task, MathTask):
        return {"grader": "math", "timeout": task.grade_timeout}
    meta = {k: v for k, v in instance.meta.items() if k not in ("images", "image")}
    spec = {"grader": "task", "task": task_name, "options": options, "id": instance.id, "prompt": instance.prompt,
            "meta": meta}
    try:
        json.dumps(spec)
    except TypeError as error:
        raise ValueError(f"task {task_name!r} instance {instance.id}: its options / meta are not JSON ({error})") from None
    return spec


def verl_rows(task, task_name: str, options: dict, instances: Sequence, split: str,
              system: str | None = None) -> list[dict]:
    """One verl row per instance of ``task`` (built as ``get_task(task_name, **options)``; module docstring).

    ``system`` is the system turn (default: the task's ``system_prompt``; none when both are empty).
    """
    from latentx.vision import vision_content

    system = task.system_prompt if system is None else system
    rows = []
    for index, inst in enumerate(instances):
        where = f"task {task_name!r} instance {inst.id}"
        refs = list(task.images(inst))
        text = "".join("<image>" if part["type"] == "image" else part["text"]
                       for part in vision_content(inst.prompt, len(refs), where))
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        rows.append({
            "data_source": DATA_SOURCE_PREFIX + task_name,
            "prompt": prompt,
            IMAGE_KEY: [_png(ref, f"{where} image {k}") for k, ref in enumerate(refs)],
            "ability": "vision" if refs else "text",
            "reward_model": {"style": "rule", "ground_truth": str(inst.answer)},
            "extra_info": {"index": index, "split": split,
                           "latentx": json.dumps(_grader_spec(task, task_name, options, inst))},
        })
    return rows


def write_parquet(rows: Sequence[dict], path: str | Path) -> Path:
    """Write ``rows`` (from :func:`verl_rows`) as one Parquet file; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise ValueError(f"{path}: no rows to write")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        (IMAGE_KEY, pa.list_(image)),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string()), ("latentx", pa.string())])),
    ])
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), path)
    return path


@functools.lru_cache(maxsize=16)
def _task(name: str, options_json: str):
    from latentx.tasks import get_task

    return get_task(name, **json.loads(options_json))


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  **_: Any) -> float:
    """verl's ``custom_reward_function`` for rows written by :func:`verl_rows`: 1.0 / 0.0 from the task's
    own verifier (module docstring).  A row without the latentx grader spec is a one-line error."""
    spec_text = (extra_info or {}).get("latentx")
    if not isinstance(spec_text, str):
        raise ValueError(
            f"latentx reward: row of data_source {data_source!r} has no extra_info.latentx grader spec "
            "(write the data with latentx.integrations.verl.data.verl_rows / examples/verl/vl_data.py)"
        )
    spec = json.loads(spec_text)
    if spec.get("grader") == "math":
        from latentx.tasks.math_task import MathTask

        return MathTask.score(solution_str, ground_truth, timeout=float(spec.get("timeout", 5.0)))
    if spec.get("grader") != "task":
        raise ValueError(f"latentx reward: unknown grader {spec.get('grader')!r} in extra_info.latentx")
    from latentx.tasks.base import TaskInstance

    task = _task(spec["task"], json.dumps(spec["options"], sort_keys=True))
    instance = TaskInstance(spec["id"], spec["prompt"], ground_truth, spec["meta"])
    return float(task.reward(instance, solution_str))
