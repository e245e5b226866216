"""The terminal of a run: one bar per long loop, one elapsed-time line per other long phase, nothing else.

``latentx train`` shows a bar for the warm start and one for the RL steps; the other long phases
(starting-policy evaluation, final evaluation, Koopman dictionary fit) each print one line with their
wall time, through :func:`phase`.  :func:`silence_third_party` keeps the libraries underneath from adding
their own progress bars and advisory warnings (transformers' "Writing model shards" bars, generation-config
notes, hub download bars); it is called by the CLI, not by the library, so a Python user keeps them.
``--quiet`` turns all of it off: :func:`printer` returns a no-op.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["silence_third_party", "phase", "printer", "Log"]

Log = Callable[[str], Any]


def _quiet(*_: Any, **__: Any) -> None:
    return None


def printer(quiet: bool) -> Log:
    """``print`` (rich-aware: it goes above a live progress bar), or a no-op when ``quiet``."""
    return _quiet if quiet else print


def silence_third_party() -> None:
    """Turn off the progress bars and advisory warnings of transformers / huggingface_hub / torch."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    # Warnings transformers / torch raise through ``warnings`` for settings latentx chooses on purpose
    # (sampling flags on a greedy generation config, a pad token equal to eos, ...).
    for pattern in (r".*generation[_ ]config.*", r".*`do_sample` is set to `False`.*", r".*pad_token_id.*",
                    r".*attention mask.*", r".*TypedStorage is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _seconds(elapsed: float) -> str:
    if elapsed < 60:
        return f"{elapsed:.1f} s"
    minutes, seconds = divmod(int(round(elapsed)), 60)
    return f"{minutes} min {seconds:02d} s"


@contextmanager
def phase(label: str, log: Log, done: str | None = None) -> Iterator[dict[str, Any]]:
    """Print ``label ...`` now and ``done: <result> (12.3 s)`` when the block ends (``done`` defaults
    to ``label``).  The block may set ``info["result"]`` to a short text shown in the closing line."""
    info: dict[str, Any] = {}
    log(f"{label} ...")
    start = time.perf_counter()
    yield info
    elapsed = time.perf_counter() - start
    info["elapsed"] = elapsed
    result = info.get("result")
    log(f"{done or label}: {result + ' ' if result else 'done '}({_seconds(elapsed)})")
