"""The ``fsynced`` fixture: which files and directories a test's code fsyncs (the real fsync is still made)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

#: Each fsync: the path of its descriptor (read back from /proc/self/fd) and, for a directory, its entries then.
Synced = list[tuple[Path, list[str]]]


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> Synced:
    """Each ``os.fsync`` made, as the path of its descriptor (read back from /proc/self/fd) and, for a
    directory, its entries at that moment; the real fsync is still made."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file a descriptor is")
    real, seen = os.fsync, []

    def spy(fd: Any) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}"))
        seen.append((path, sorted(os.listdir(path)) if path.is_dir() else []))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen
