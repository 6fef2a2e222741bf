"""The verify sweep and older versions' temporaries (bastion/store/leftovers.py).

Older bastion versions verified in ``bastion-verify-*`` directories made with
TemporaryDirectory and held no flock on them, so during a rolling upgrade a
new verify could not tell an old one's live directory from a killed one's and
deleted it mid-read. Locked directories now have their own prefix
(``bastion-locked-verify-``); an old-prefix one is removed only once it is a
day old (and nobody holds it locked: the version just before this one locked
its old-prefix directories).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path

import pytest

from bastion.store import leftovers


def _old(parent: Path, name: str, age: float) -> Path:
    path = parent / f"{leftovers.OLD_VERIFY_PREFIX}{name}"
    path.mkdir(mode=0o700)
    (path / "bastion.db").write_bytes(b"being read")
    stamp = time.time() - age
    os.utime(path / "bastion.db", (stamp, stamp))
    os.utime(path, (stamp, stamp))
    return path


def test_a_recent_old_version_temporary_is_kept_and_a_day_old_one_removed(tmp_path: Path) -> None:
    live = _old(tmp_path, "live", 60.0)  # an older version's verify, reading right now (no flock)
    stale = _old(tmp_path, "stale", leftovers.OLD_VERIFY_MAX_AGE + 3600)
    removed = leftovers.remove_stale_temporaries(tmp_path)
    assert removed == [stale.name]
    assert (live / "bastion.db").read_bytes() == b"being read"
    assert not stale.exists()


def test_a_day_old_old_prefix_temporary_still_locked_is_kept(tmp_path: Path) -> None:
    held = _old(tmp_path, "held", leftovers.OLD_VERIFY_MAX_AGE + 3600)
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the version before this one held its bastion-verify-* ones
        assert leftovers.remove_stale_temporaries(tmp_path) == []
        assert held.exists()
    finally:
        os.close(fd)


def test_a_recent_file_in_an_old_directory_keeps_it(tmp_path: Path) -> None:
    path = _old(tmp_path, "writing", leftovers.OLD_VERIFY_MAX_AGE + 3600)
    (path / "bastion.db").write_bytes(b"still being written")  # its newest file is fresh
    assert leftovers.remove_stale_temporaries(tmp_path) == []


def test_new_temporaries_have_their_own_prefix_and_leave_old_live_ones_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    live = _old(tmp_path, "live", 60.0)
    with leftovers.private_temporary() as path:
        assert path.parent == tmp_path and path.name.startswith(leftovers.VERIFY_PREFIX)
        assert not path.name.startswith(leftovers.OLD_VERIFY_PREFIX)
        assert path.stat().st_mode & 0o777 == 0o700
        assert live.exists()
    assert not path.exists() and live.exists()
