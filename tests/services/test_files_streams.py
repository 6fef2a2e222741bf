"""The files service while a stream is running: access withdrawn mid-download, an upload cancelled as its call
begins (real stores, both backends)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

import bastion
import bastion.services.files as files_module
from bastion.config import FilesConfig
from bastion.security.credentials import User
from bastion.security.principal import Principal
from bastion.services.files import Files
from bastion.store import open_store
from bastion.testing import MemoryServer
from tests.services.test_files import CHUNK, World, offset_reaches, run, sha
from tests.support.stores import service_store

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


def test_taking_away_the_role_a_share_named_ends_a_download_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download's re-checks judged access with the roles its caller had when the call began: a grantee
    through a role shared with it kept receiving the whole file after the role was taken from it (an
    upload's commit already judged with the credential store's roles of the moment). They now read the
    caller's row, as an upload's commit does (a principal with none: as revalidation last saw it)."""
    monkeypatch.setattr(files_module, "ACCESS_RECHECK", 0.0)  # every chunk, so the test needs no clock
    data = os.urandom(64 * CHUNK)  # far more than the credit window holds in flight

    async def test(w: World) -> None:
        users = w.files.users
        assert users is not None
        await users.create_user(User("carol", frozenset({"team"})))
        doc = await w.put(w.alice, "doc", data)
        await w.alice.files.share(file_id=doc["id"], role="team")
        received = 0
        with pytest.raises(bastion.NotFound, match="no longer"):
            async for chunk in w.carol.stream("files.download", file_id=doc["id"]):
                if received == 0:
                    assert await users.set_access("carol", frozenset(), False)  # auth.set_roles(carol, [])
                received += len(chunk)
        assert received < len(data)
        with pytest.raises(bastion.NotFound):  # as a new call finds it (once revalidation has the roles)
            await w.server.client(principal=Principal("carol")).files.stat(file_id=doc["id"])

    run(test, tmp_path)


def test_an_upload_cancelled_as_its_call_begins_ends_not_found(tmp_path: Path) -> None:
    """A cancel landing between the call's look-up of the upload and its first mark of activity was missed
    (the mark's answer, no such upload, was ignored): the call took the bytes into a file nobody would
    read and answered as if the server held them. A real interleaving: the cancel's DELETE holds the row
    until the call's mark waits on it, then commits."""
    location = service_store(tmp_path)
    if not location.startswith("postgresql"):
        pytest.skip("needs PostgreSQL's row locks to hold the call at its first mark of activity")
    data = os.urandom(2 * CHUNK)

    async def main() -> None:
        async with open_store(location) as store:
            files = Files(store, tmp_path / "files", FilesConfig(chunk_bytes=CHUNK), leader=False)
            await files.start()
            async with MemoryServer([files.service]) as server:
                await asyncio.wait_for(test(World(server, files, tmp_path / "files")), 20)

    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="x", size=len(data), sha256=sha(data))
        upload_id, path = info["upload_id"], w.directory / "uploads" / info["upload_id"]
        canceller = await asyncpg.connect(location)
        try:
            cancel = canceller.transaction()
            await cancel.start()
            await canceller.execute("DELETE FROM file_uploads WHERE id = $1", upload_id)
            call = asyncio.create_task(w.alice.upload("files.upload", [data[:CHUNK]], upload_id=upload_id))
            deadline = time.monotonic() + 10
            blocked = "SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            while not await canceller.fetchval(blocked):
                assert time.monotonic() < deadline and not call.done(), "the call never waited on the cancel"
                await asyncio.sleep(0.01)
            await cancel.commit()
            path.unlink(missing_ok=True)  # the cancel's second step
        finally:
            await canceller.close()
        with pytest.raises(bastion.NotFound, match=upload_id):
            await call
        assert not path.exists()

    asyncio.run(main())


def test_a_cancelled_upload_stops_taking_bytes_at_once(tmp_path: Path) -> None:
    """A cancel (or an expiry) releases the reservation at once, but the stream still arriving kept writing
    into the unlinked upload file until its next mark of activity -- up to a minute -- or its last byte:
    up to the declared size on disk, in nobody's quota, while the freed quota took another upload (one user
    cancelling and beginning again held many times the quota on disk). Each chunk now first checks that
    its upload file is still linked."""
    total = 64  # chunks: far more than the credit window holds in flight
    data = os.urandom(total * CHUNK)

    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="x", size=len(data), sha256=sha(data))
        cancelled = asyncio.Event()
        sent = 0

        async def stream() -> AsyncIterator[bytes]:
            nonlocal sent
            for i in range(total):
                if i == 1:
                    await cancelled.wait()
                sent += 1
                yield data[i * CHUNK : (i + 1) * CHUNK]

        call = asyncio.create_task(w.alice.upload("files.upload", stream(), upload_id=info["upload_id"]))
        await offset_reaches(w.alice, info["upload_id"], CHUNK)
        assert await w.alice.files.cancel_upload(upload_id=info["upload_id"]) is True
        cancelled.set()
        with pytest.raises(bastion.NotFound, match="finished, cancelled or expired"):
            await call
        assert sent < total  # the call ended at the first chunk after the cancel (what was in flight aside)
        assert (await w.alice.files.usage())["reserved_bytes"] == 0

    run(test, tmp_path)
