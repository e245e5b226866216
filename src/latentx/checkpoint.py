"""Run-directory checkpoints, written atomically and resumed exactly.

Layout of ``RUN/checkpoints/``::

    LATEST                      text file: the name of the newest *complete* checkpoint
    step_000040/
        model/                  ``save_pretrained`` weights + tokenizer (loadable by any HF tool)
        trainer_state.pt        step, optimizer, RNG states, VERL baselines, entropy controller, ...
        koopman.safetensors     the ReLaX dictionary, when there is one

A checkpoint is written into a temporary sibling folder and renamed into place only when complete;
``LATEST`` is replaced atomically after that.  A run killed mid-write leaves at most a ``.tmp-*``
folder, which :func:`latest_checkpoint` ignores and :func:`save_checkpoint` cleans up.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentx.config import atomic_write_text

LATEST = "LATEST"


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
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_weights(model, tmp / "model")
        from latentx.vision import save_tokenizer

        save_tokenizer(tokenizer, tmp / "model")  # a VLM's processor too
        torch.save(trainer_state, tmp / "trainer_state.pt")
        if dictionary is not None:
            dictionary.save(tmp / "koopman.safetensors")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name + "\n")
    if keep_last > 0:
        complete = _complete_checkpoints(root)
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory, or None if it has none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "trainer_state.pt").is_file() and (candidate / "model").is_dir():
            return candidate
    # LATEST missing or dangling (killed between rename and pointer update): newest complete folder.
    complete = _complete_checkpoints(root)
    return complete[-1] if complete else None


def _complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").is_file() and (p / "model").is_dir())


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=False)
