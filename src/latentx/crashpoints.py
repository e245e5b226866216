"""Named points between the write steps of a run, so that crash tests can stop a run *exactly* there.

Every multi-step write of a run directory (``metrics.jsonl`` rows, checkpoints, ``LATEST``, atomic
text files) calls :func:`crash_point` between its steps.  In normal use nothing is registered and the
call does nothing.  A test registers a hook with :func:`watch` and copies the run directory at each
point: each copy is exactly what ``kill -9`` at that moment would leave on disk (no ``finally`` or
``except`` block has run), and resuming from every copy tests every kill point without any timing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["crash_point", "watch"]

_HOOKS: list[Callable[[str, Path], None]] = []


def crash_point(name: str, path: str | Path) -> None:
    """Announce that the write ``name`` of ``path`` has just reached a consistent-or-torn state."""
    for hook in tuple(_HOOKS):
        hook(name, Path(path))


@contextlib.contextmanager
def watch(hook: Callable[[str, Path], None]) -> Iterator[None]:
    """Call ``hook(name, path)`` at every crash point while the ``with`` block runs."""
    _HOOKS.append(hook)
    try:
        yield
    finally:
        _HOOKS.remove(hook)
