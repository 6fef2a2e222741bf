"""The files service's bounds on uploads and what withdrawing a share does to them (real stores, both backends)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bastion
from bastion.config import FilesConfig
from tests.services.test_files import CHUNK, World, run, sha

pytestmark = pytest.mark.usefixtures("service_backend")


def test_a_grantee_reserves_at_most_its_share_of_the_owners_quota(tmp_path: Path) -> None:
    """A write grantee could reserve the owner's whole quota with uploads it never finishes."""
    config = FilesConfig(quota_bytes=10_000, chunk_bytes=CHUNK, max_grantee_reserved_bytes=2_000)

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"x" * 100)
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        await w.bob.files.begin_upload(file_id=doc["id"], size=1_500, sha256=sha(b"y" * 1_500))
        with pytest.raises(bastion.ResourceExhausted, match="max_grantee_reserved_bytes") as refused:
            await w.bob.files.begin_upload(file_id=doc["id"], size=600, sha256=sha(b"z" * 600))
        assert "1500 bytes reserved in 'alice'" in refused.value.message
        await w.bob.files.begin_upload(file_id=doc["id"], size=500, sha256=sha(b"z" * 500))  # up to the bound
        assert (await w.alice.files.usage())["reserved_bytes"] == 2_000
        # The owner's own uploads are bounded by the quota alone.
        await w.alice.files.begin_upload(name="big", size=7_900, sha256=sha(b"b" * 7_900))

    run(test, tmp_path, config)


def test_an_uploader_holds_at_most_max_open_uploads(tmp_path: Path) -> None:
    """Zero-byte uploads reserve nothing: without a count, one user could pile up rows and files for upload_ttl."""
    config = FilesConfig(quota_bytes=10_000, chunk_bytes=CHUNK, max_open_uploads=3)

    async def test(w: World) -> None:
        for i in range(3):
            await w.alice.files.begin_upload(name=f"e{i}", size=0, sha256=sha(b""))
        with pytest.raises(bastion.ResourceExhausted, match="max_open_uploads"):
            await w.alice.files.begin_upload(name="e3", size=0, sha256=sha(b""))
        assert len(os.listdir(w.directory / "uploads")) == 3
        await w.bob.files.begin_upload(name="e3", size=0, sha256=sha(b""))  # per uploader
        first = (await w.alice.files.uploads())[0]
        await w.alice.files.cancel_upload(upload_id=first["upload_id"])
        await w.alice.files.begin_upload(name="e3", size=0, sha256=sha(b""))

    run(test, tmp_path, config)


def test_the_limits_are_validated_at_load() -> None:
    for bad in ({"max_open_uploads": 0}, {"max_grantee_reserved_bytes": -1}):
        with pytest.raises(bastion.UsageError, match=next(iter(bad))):
            FilesConfig(**bad)  # type: ignore[arg-type]
