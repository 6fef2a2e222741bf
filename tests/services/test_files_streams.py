"""The files service while a stream is running: access withdrawn mid-download (real stores, both backends)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bastion
import bastion.services.files as files_module
from tests.services.test_files import CHUNK, World, run

pytestmark = pytest.mark.usefixtures("service_backend")


def test_withdrawing_a_share_ends_a_download_in_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grantee that had begun a large download kept receiving the whole file after the owner unshared it."""
    monkeypatch.setattr(files_module, "ACCESS_RECHECK", 0.0)  # every chunk, so the test needs no clock
    data = os.urandom(64 * CHUNK)  # far more than the credit window holds in flight

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", data)
        await w.alice.files.share(file_id=doc["id"], user="bob")
        received = 0
        with pytest.raises(bastion.NotFound, match="no longer"):
            async for chunk in w.bob.stream("files.download", file_id=doc["id"]):
                if received == 0:
                    await w.alice.files.unshare(file_id=doc["id"], user="bob")
                received += len(chunk)
        assert received < len(data)
        # A share that still lets the grantee read (write made read-only) leaves its download alone,
        # and the owner's own downloads are untouched.
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        received = 0
        async for chunk in w.bob.stream("files.download", file_id=doc["id"]):
            if received == 0:
                await w.alice.files.share(file_id=doc["id"], user="bob", mode="read")
            received += len(chunk)
        assert received == len(data)
        assert await w.get(w.alice, file_id=doc["id"]) == data

    run(test, tmp_path)


def test_deleting_a_file_ends_a_grantees_download_in_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_module, "ACCESS_RECHECK", 0.0)
    data = os.urandom(64 * CHUNK)

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", data)
        await w.alice.files.share(file_id=doc["id"], role="team")
        received = 0
        with pytest.raises(bastion.NotFound, match="no longer"):
            async for chunk in w.carol.stream("files.download", file_id=doc["id"]):
                if received == 0:
                    await w.alice.files.delete(file_id=doc["id"])
                received += len(chunk)
        assert received < len(data)

    run(test, tmp_path)
