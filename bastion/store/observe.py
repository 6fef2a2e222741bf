"""How long store operations take: a hook the server sets for /metrics.

``observer`` is None (nothing timed beyond one clock read) until the entry
point (``bastion serve``) sets it to a function ``observer(kind, seconds)``;
the backends call ``done(kind, started)`` when an operation finishes, with
``started`` a ``time.perf_counter()`` reading. Kinds: ``"write"`` and
``"read"`` (SQLite: a write including its group commit, a read on a reader
thread) and ``"call"`` (PostgreSQL: one pooled call). Module-level because a
process has one metrics registry, whichever store objects it opens.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["done", "observer"]

observer: Callable[[str, float], None] | None = None


def done(kind: str, started: float) -> None:
    """An operation of ``kind`` that began at ``started`` (``time.perf_counter()``) has finished."""
    if observer is not None:
        observer(kind, time.perf_counter() - started)
