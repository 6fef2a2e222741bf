"""The files directory after a power cut: every entry a recorded file depends on is fsynced before it is
recorded (real stores, both backends; os.fsync spied on, the real fsync still made)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.services.test_files import World, run, sha
from tests.support.fsync import Synced, fsynced

pytestmark = pytest.mark.usefixtures("service_backend")

__all__ = ["fsynced"]  # the fixture, used here


def test_a_new_blob_directory_is_fsynced_into_blobs_before_the_file_is_recorded(
    tmp_path: Path, fsynced: Synced
) -> None:
    """``place`` made ``blobs/<sha256[:2]>/`` and fsynced only that new directory (holding the blob), never
    ``blobs/`` holding the new directory's entry: after a power cut the record could name a blob whose
    directory was gone. Likewise the files directory, ``blobs/`` and ``uploads/`` made at start."""
    root = tmp_path.resolve()
    files = root / "files"
    data = b"contents that need a new blob directory"
    digest = sha(data)

    async def test(w: World) -> None:
        # Made at start: each new directory's entry is synced into its parent.
        assert any(path == root and "files" in entries for path, entries in fsynced)
        assert (files, ["blobs", "uploads"]) in fsynced
        fsynced.clear()
        await w.put(w.alice, "a", data)
        synced = [entry for entry in fsynced if files in entry[0].parents]
        assert (files / "blobs" / digest[:2], [digest]) in synced
        assert (files / "blobs", [digest[:2]]) in synced
        fsynced.clear()
        other = next(b for b in (str(i).encode() for i in range(100_000)) if sha(b)[:2] == digest[:2])
        await w.put(w.alice, "b", other)  # its directory is there already: nothing more to sync but itself
        assert [entry for entry in fsynced if entry[0] == files / "blobs"] == []

    run(test, tmp_path)
