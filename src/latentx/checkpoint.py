"""Run-directory checkpoints, written atomically and resumed exactly.

Layout of ``RUN/checkpoints/``::

    LATEST                      text file: the name of the newest checkpoint (for other tools; see below)
    step_000040/
        model/                  ``save_pretrained`` weights + tokenizer (loadable by any HF tool)
        trainer_state.pt        step, optimizer, RNG states, VERL baselines, entropy controller, ...
        koopman.safetensors     the ReLaX dictionary, when there is one

Crash safety, step by step (``kill -9`` may land between any two of them; tests stop a run at each
one through :mod:`latentx.crashpoints`):

1. a checkpoint is written into a temporary sibling ``.tmp-step_N-*`` and renamed to ``step_N`` only
   when complete, so a ``step_N`` folder is always complete;
2. ``LATEST`` is then replaced atomically; resuming does not trust it: :func:`latest_checkpoint` takes the
   newest complete ``step_N`` folder, so a run killed between the rename and the ``LATEST`` update
   resumes from step N, not N-1;
3. old checkpoints are removed by renaming them to ``.tmp-*`` first, so a half-deleted folder is never
   taken for a checkpoint;
4. :func:`sweep_temporaries` (called on every resume and before every checkpoint) removes what a kill
   leaves behind: ``.tmp-*`` folders and the ``.NAME.*.tmp`` files of :func:`~latentx.config.atomic_write_text`.

``metrics.jsonl`` gets one row per step, appended *before* that step's checkpoint.  On resume,
:func:`truncate_metrics` keeps exactly the rows of the steps the checkpoint holds (none without a
checkpoint) and drops a torn last line (a kill during the append) with a warning; so a resumed run never
repeats a step.  :func:`check_same_run` refuses to continue a run directory with different settings.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentx.config import ConfigError, atomic_write_text, read_yaml_file
from latentx.crashpoints import crash_point

LATEST = "LATEST"
METRICS = "metrics.jsonl"
_STEP_DIR = re.compile(r"step_(\d+)")

#: settings (or whole sections) a run directory may be continued with a different value of: the run's
#: location (a moved directory), the number of steps (extend or cut a run), the device it runs on and
#: where it reports to (``logging``); none of them changes what is trained.
RESUMABLE_CHANGES = ("out", "steps", "model.device", "logging")


class MetricsWarning(UserWarning):
    """A torn ``metrics.jsonl`` line (an interrupted append) was dropped."""


def save_weights(model, directory: str | os.PathLike) -> None:
    """``model.save_pretrained(directory)`` (safetensors) without transformers' per-shard progress bar,
    so the training bar stays the only one in the terminal; the global progress-bar setting is restored."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove_tree(path: Path) -> None:
    """Delete a folder so that no half-deleted copy is ever left under its name (rename, then delete)."""
    if not path.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=f".tmp-old-{path.name}-", dir=path.parent))
    os.replace(path, aside / path.name)
    crash_point("checkpoint:moved_aside", path)
    shutil.rmtree(aside, ignore_errors=True)


def sweep_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what an interrupted write leaves: ``checkpoints/.tmp-*`` folders and ``.NAME.*.tmp`` files."""
    run_dir = Path(run_dir)
    removed = []
    root = run_dir / "checkpoints"
    candidates = list(root.glob(".tmp-*")) + list(root.glob(".*.tmp")) if root.is_dir() else []
    candidates += list(run_dir.glob(".*.tmp")) if run_dir.is_dir() else []
    for path in candidates:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model,
    tokenizer,
    trainer_state: dict[str, Any],
    dictionary=None,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint ``step`` atomically and point ``LATEST`` at it; keep the newest ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(run_dir)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_weights(model, tmp / "model")
        from latentx.vision import save_tokenizer

        save_tokenizer(tokenizer, tmp / "model")  # a VLM's processor too
        crash_point("checkpoint:model_written", tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        if dictionary is not None:
            dictionary.save(tmp / "koopman.safetensors")
        crash_point("checkpoint:state_written", tmp)
        _remove_tree(final)  # a checkpoint of the same step written before (a re-run of the last step)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    crash_point("checkpoint:renamed", final)
    atomic_write_text(root / LATEST, final.name + "\n")
    crash_point("checkpoint:latest_written", final)
    if keep_last > 0:
        for old in _complete_checkpoints(root)[:-keep_last]:
            _remove_tree(old)
    crash_point("checkpoint:done", final)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory (by step number), or None if it has none.

    ``LATEST`` is not consulted: a kill between renaming ``step_N`` into place and updating ``LATEST``
    leaves a pointer to N-1 although step N is complete.
    """
    complete = _complete_checkpoints(Path(run_dir) / "checkpoints")
    return complete[-1] if complete else None


def _complete_checkpoints(root: Path) -> list[Path]:
    """``step_N`` folders holding a state file and a model folder, oldest first (by N, not by name)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and (path / "trainer_state.pt").is_file() and (path / "model").is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------------
# metrics.jsonl
# ------------------------------------------------------------------------------------------------


def _parse_metrics(path: Path) -> tuple[list[dict], bool]:
    """The rows of ``path`` and whether the file needs rewriting (a torn last line was dropped).

    Only the last line can be torn (rows are appended one at a time): it is dropped with a
    :class:`MetricsWarning`.  A malformed line before it is damage we did not cause: a ``ValueError``
    naming the file and the line.
    """
    if not path.is_file():
        return [], False
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    rows: list[dict] = []
    dirty = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = all(not rest.strip() for rest in lines[number:])
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with an integer 'step'")
        except ValueError as err:
            if not last:
                raise ValueError(f"{path}: line {number} is not a metrics row ({err}); fix or remove it") from None
            warnings.warn(
                f"{path}: the last line ({len(line)} characters) is torn, an interrupted write; dropped it",
                MetricsWarning, stacklevel=3,
            )
            dirty = True
            continue
        rows.append(row)
    if text and not text.endswith("\n"):
        dirty = True  # the next append must start on a fresh line
    return rows, dirty


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The ``metrics.jsonl`` rows of a run directory (a torn last line is skipped with a warning)."""
    return _parse_metrics(Path(run_dir) / METRICS)[0]


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> list[dict]:
    """Keep the rows of steps ``<= step`` (those the checkpoint being resumed holds; ``step = 0`` for a run
    without a checkpoint) and drop a torn last line; rewrites the file atomically when that changes it."""
    path = Path(run_dir) / METRICS
    rows, dirty = _parse_metrics(path)
    kept = [row for row in rows if row["step"] <= step]
    if dirty or len(kept) != len(rows):
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    return kept


def append_metrics(run_dir: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one row (one ``write`` of one line) to ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    crash_point("metrics:appended", path)


# ------------------------------------------------------------------------------------------------
# Continuing a run directory
# ------------------------------------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return float(old) == float(new)
    return old == new


def config_differences(old: dict[str, Any], new: dict[str, Any], allowed=RESUMABLE_CHANGES) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every setting present in both that differs."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    skip = tuple(allowed)

    def allowed_key(key: str) -> bool:
        return any(key == entry or key.startswith(entry + ".") for entry in skip)

    return [
        (key, flat_old[key], flat_new[key])
        for key in flat_new
        if key in flat_old and not allowed_key(key) and not _same(flat_old[key], flat_new[key])
    ]


def run_differences(run_dir: str | os.PathLike, config: dict[str, Any], allowed=RESUMABLE_CHANGES) -> str | None:
    """How ``config`` (the plain dict of a resolved config) differs from ``run_dir``'s ``config.yaml``: one
    line naming each differing setting with both values (the first four), or None when the directory has
    no ``config.yaml`` (a new run) or only settings under ``allowed`` differ."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    saved = read_yaml_file(path)
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a latentx run config (top level is {type(saved).__name__})")
    differences = config_differences(saved, config, allowed)
    if not differences:
        return None
    shown = "; ".join(f"{key} is {old!r} there, {new!r} now" for key, old, new in differences[:4])
    return shown + (f" (and {len(differences) - 4} more)" if len(differences) > 4 else "")


def check_same_run(run_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """Refuse to continue ``run_dir`` with settings that differ from its ``config.yaml``.

    ``config`` is the plain dict of the (resolved) config about to run.  Only :data:`RESUMABLE_CHANGES`
    may differ.  The error is one line naming each differing setting with both values
    (:func:`run_differences`); nothing is written.  A directory without ``config.yaml`` is a new run.
    """
    shown = run_differences(run_dir, config)
    if shown is not None:
        raise ConfigError(
            f"{run_dir} holds a run made with other settings: {shown}. Continue it with "
            f"`latentx train --resume {run_dir}` (optionally --steps N), or choose another --out"
        )
