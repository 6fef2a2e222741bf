"""The files service over a real SQLite store and a real files directory, through the in-memory pair."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

import bastion
from bastion.config import FilesConfig
from bastion.security.credentials import User
from bastion.security.principal import ADMIN_ROLE, Principal
from bastion.services.files import Files, check_name
from bastion.store import open_store
from bastion.store.files import PIN_SECONDS
from bastion.testing import TESTER, MemoryServer
from tests.support.stores import service_store

pytestmark = pytest.mark.usefixtures("service_backend")

ALICE = Principal("alice")
BOB = Principal("bob")
CAROL = Principal("carol", frozenset({"team"}))
CHUNK = 64 * 1024
USERS = (User("alice"), User("bob"), User("carol", frozenset({"team"})), User("tester", frozenset({ADMIN_ROLE})))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunks(data: bytes, size: int = CHUNK) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


class World:
    def __init__(self, server: MemoryServer, files: Files, directory: Path) -> None:
        self.server, self.files, self.directory = server, files, directory
        self.alice = server.client(principal=ALICE)
        self.bob = server.client(principal=BOB)
        self.carol = server.client(principal=CAROL)
        self.admin = server.client(principal=TESTER)

    async def put(self, client: bastion.Client, name: str, data: bytes, **kw: Any) -> dict[str, Any]:
        info = await client.files.begin_upload(name=name, size=len(data), sha256=sha(data), **kw)
        result = await client.upload("files.upload", chunks(data), upload_id=info["upload_id"])
        assert result["complete"] is True
        file: dict[str, Any] = result["file"]
        return file

    async def get(self, client: bastion.Client, **ref: Any) -> bytes:
        return b"".join([c async for c in client.stream("files.download", **ref)])

    def blobs(self) -> list[Path]:
        return sorted(p for p in (self.directory / "blobs").rglob("*") if p.is_file())


@asynccontextmanager
async def world(tmp_path: Path, config: FilesConfig | None = None) -> AsyncIterator[World]:
    async with open_store(service_store(tmp_path)) as store:
        files = Files(store, tmp_path / "files", config or FilesConfig(quota_bytes=10_000_000, chunk_bytes=CHUNK))
        await files.start()
        try:
            async with MemoryServer([files.service]) as server:
                yield World(server, files, tmp_path / "files")
        finally:
            await files.aclose()


def run(test: Callable[[World], Awaitable[None]], tmp_path: Path, config: FilesConfig | None = None) -> None:
    async def main() -> None:
        async with world(tmp_path, config) as w:
            await asyncio.wait_for(test(w), 20)

    asyncio.run(main())


def test_upload_then_download_verifies_and_lays_out_blobs(tmp_path: Path) -> None:
    data = os.urandom(300_000)

    async def test(w: World) -> None:
        file = await w.put(w.alice, "reports/q3.bin", data)
        assert (file["name"], file["owner"], file["size"], file["sha256"]) == (
            "reports/q3.bin",
            "alice",
            len(data),
            sha(data),
        )
        assert await w.get(w.alice, name="reports/q3.bin") == data
        assert await w.get(w.alice, file_id=file["id"], offset=100_000) == data[100_000:]
        blob = w.directory / "blobs" / sha(data)[:2] / sha(data)
        assert blob.read_bytes() == data
        assert blob.stat().st_mode & 0o777 == 0o600 and blob.parent.stat().st_mode & 0o777 == 0o700
        assert list((w.directory / "uploads").iterdir()) == []
        stat = await w.alice.files.stat(name="reports/q3.bin")
        assert stat["access"] == "owner" and stat["id"] == file["id"]
        usage = await w.alice.files.usage()
        assert (usage["files_bytes"], usage["reserved_bytes"]) == (len(data), 0)

    run(test, tmp_path)


def test_download_chunks_are_bounded_by_chunk_bytes(tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 7)

    async def test(w: World) -> None:
        await w.put(w.alice, "a", data)
        sizes = [len(c) async for c in w.alice.stream("files.download", name="a")]
        assert sizes == [CHUNK] * 5 + [7]

    run(test, tmp_path)


def test_interrupted_upload_resumes_from_the_server_offset(tmp_path: Path) -> None:
    data = os.urandom(400_000)

    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="big", size=len(data), sha256=sha(data))
        part = await w.alice.upload("files.upload", chunks(data[:150_000]), upload_id=info["upload_id"])
        assert (part["complete"], part["offset"]) == (False, 150_000)
        status = await w.alice.files.upload_status(upload_id=info["upload_id"])
        assert status["offset"] == 150_000
        with pytest.raises(bastion.FailedPrecondition, match="continue from offset 150000"):
            await w.alice.upload("files.upload", chunks(data[100_000:]), upload_id=info["upload_id"], offset=100_000)
        done = await w.alice.upload("files.upload", chunks(data[150_000:]), upload_id=info["upload_id"], offset=150_000)
        assert done["complete"] and done["file"]["sha256"] == sha(data)
        assert await w.get(w.alice, name="big") == data
        with pytest.raises(bastion.NotFound):
            await w.alice.files.upload_status(upload_id=info["upload_id"])

    run(test, tmp_path)


def test_wrong_sha256_is_refused_and_the_upload_discarded(tmp_path: Path) -> None:
    data = os.urandom(100_000)

    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="x", size=len(data), sha256=sha(b"other"))
        with pytest.raises(bastion.InvalidArgument, match=r"SHA-256 .* not the declared"):
            await w.alice.upload("files.upload", chunks(data), upload_id=info["upload_id"])
        with pytest.raises(bastion.NotFound):
            await w.alice.files.upload_status(upload_id=info["upload_id"])
        with pytest.raises(bastion.NotFound):
            await w.alice.files.stat(name="x")
        assert list((w.directory / "uploads").iterdir()) == [] and w.blobs() == []
        assert (await w.alice.files.usage())["reserved_bytes"] == 0

    run(test, tmp_path)


def test_more_bytes_than_declared_are_refused(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="x", size=10, sha256=sha(b"0123456789"))
        with pytest.raises(bastion.InvalidArgument, match="more than the declared 10 bytes"):
            await w.alice.upload("files.upload", [b"0123456789A"], upload_id=info["upload_id"])
        with pytest.raises(bastion.NotFound):
            await w.alice.files.upload_status(upload_id=info["upload_id"])

    run(test, tmp_path)


def test_quota_counts_files_and_open_uploads(tmp_path: Path) -> None:
    config = FilesConfig(quota_bytes=1000, chunk_bytes=CHUNK)

    async def test(w: World) -> None:
        await w.put(w.alice, "a", b"x" * 600)
        await w.alice.files.begin_upload(name="b", size=300, sha256=sha(b"y" * 300))
        with pytest.raises(
            bastion.ResourceExhausted, match=r"900 bytes used or reserved \+ 200 requested > limit 1000"
        ):
            await w.alice.files.begin_upload(name="c", size=200, sha256=sha(b"z" * 200))
        await w.bob.files.begin_upload(name="c", size=1000, sha256=sha(b"z" * 1000))  # quotas are per user
        usage = await w.alice.files.usage()
        assert (usage["files_bytes"], usage["reserved_bytes"], usage["quota_bytes"]) == (600, 300, 1000)
        await w.alice.files.delete(name="a")
        await w.alice.files.begin_upload(name="c", size=200, sha256=sha(b"z" * 200))

    run(test, tmp_path, config)


def test_sharing_read_write_roles_and_strangers(tmp_path: Path) -> None:
    data = b"shared contents"

    async def test(w: World) -> None:
        file = await w.put(w.alice, "doc", data)
        ref = {"file_id": file["id"]}
        # A stranger cannot tell the file from a missing one.
        missing = "no file 'f-" + "0" * 32 + "'"
        for call in (w.bob.files.stat, w.bob.files.delete):
            with pytest.raises(bastion.NotFound) as info:
                await call(**ref)
            assert info.value.message == f"no file {file['id']!r}"
        with pytest.raises(bastion.NotFound) as other:
            await w.bob.files.stat(file_id="f-" + "0" * 32)
        assert other.value.message == missing
        await w.alice.files.share(**ref, user="bob", mode="read")
        assert await w.get(w.bob, **ref) == data
        assert (await w.bob.files.stat(name="doc", owner="alice"))["access"] == "read"
        with pytest.raises(bastion.PermissionDenied, match="read-only share"):
            await w.bob.files.delete(**ref)
        with pytest.raises(bastion.PermissionDenied):
            await w.bob.files.begin_upload(file_id=file["id"], size=1, sha256=sha(b"!"))
        with pytest.raises(bastion.PermissionDenied):
            await w.bob.files.share(**ref, user="carol")
        # A write share through a role: replace the contents, then delete.
        await w.alice.files.share(**ref, role="team", mode="write")
        grants = await w.alice.files.shares(**ref)
        assert [(g["kind"], g["grantee"], g["mode"]) for g in grants] == [
            ("role", "team", "write"),
            ("user", "bob", "read"),
        ]
        new = b"carol's version"
        info = await w.carol.files.begin_upload(file_id=file["id"], size=len(new), sha256=sha(new))
        assert info["owner"] == "alice"
        result = await w.carol.upload("files.upload", [new], upload_id=info["upload_id"])
        assert result["file"]["id"] == file["id"] and result["file"]["owner"] == "alice"
        assert await w.get(w.bob, **ref) == new
        listed = await w.carol.files.list()
        assert [(f["owner"], f["name"], f["access"]) for f in listed["files"]] == [("alice", "doc", "write")]
        assert await w.alice.files.unshare(**ref, user="bob") is True
        with pytest.raises(bastion.NotFound):
            await w.bob.files.stat(**ref)
        await w.carol.files.delete(**ref)
        with pytest.raises(bastion.NotFound):
            await w.alice.files.stat(**ref)

    run(test, tmp_path)


def test_list_pages_by_owner_and_name_and_admin_sees_all(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        for name in ("b/2", "a", "b/1", "c"):
            await w.put(w.alice, name, name.encode())
        await w.put(w.bob, "zzz", b"bob")
        page = await w.alice.files.list(limit=2)
        assert [f["name"] for f in page["files"]] == ["a", "b/1"] and page["next"]
        page2 = await w.alice.files.list(limit=2, after=page["next"])
        assert [f["name"] for f in page2["files"]] == ["b/2", "c"]
        assert [f["name"] for f in (await w.alice.files.list(prefix="b/"))["files"]] == ["b/1", "b/2"]
        assert (await w.alice.files.list(prefix="B/"))["files"] == []  # prefixes are case-sensitive
        with pytest.raises(bastion.PermissionDenied):
            await w.alice.files.list(all=True)
        everyone = await w.admin.files.list(all=True)
        assert [(f["owner"], f["access"]) for f in everyone["files"]][-1] == ("bob", "admin")
        with pytest.raises(bastion.InvalidArgument):
            await w.alice.files.list(after="not a cursor")

    run(test, tmp_path)


def test_a_list_naming_nul_is_answered_alike_on_every_backend(tmp_path: Path) -> None:
    """No file name or user name holds NUL, so a prefix, owner or cursor with one matches nothing: SQLite answered
    an empty page, but PostgreSQL (whose text cannot hold NUL) failed the call with the store's own error
    ("store: value rejected: CharacterNotInRepertoireError: ..."). A prefix or owner holding NUL is now refused by
    the dispatcher's rule (refuse_nul) on both; a cursor's names (escaped in its JSON, past the rule) answered an
    empty page, and now the rule's own answer, as files.uploads' cursor does (tests/services/test_nul_arguments.py)."""

    async def test(w: World) -> None:
        await w.put(w.alice, "a", b"a")
        cursor = msgspec.json.encode(["alice", "a\x00"]).decode()
        for args in ({"prefix": "a\x00"}, {"owner": "alice\x00"}):
            with pytest.raises(bastion.InvalidArgument, match="must not contain NUL"):
                await w.alice.files.list(**args)
        with pytest.raises(bastion.InvalidArgument, match=r"files\.list: argument after must not contain NUL"):
            await w.alice.files.list(after=cursor)

    run(test, tmp_path)


def test_an_owner_holding_nul_is_refused_alike_on_every_backend(tmp_path: Path) -> None:
    """No user name holds NUL: SQLite answered NOT_FOUND (and no usage), but PostgreSQL (whose text cannot hold NUL)
    failed these calls with the store's own error ("store: value rejected: CharacterNotInRepertoireError").
    The dispatcher's rule (refuse_nul) now answers INVALID_ARGUMENT naming the argument on both."""

    async def test(w: World) -> None:
        await w.put(w.alice, "a", b"a")
        for method in ("stat", "shares", "delete"):
            with pytest.raises(bastion.InvalidArgument, match="argument owner must not contain NUL"):
                await w.admin.invoke(f"files.{method}", {"name": "a", "owner": "alice\x00"})
        with pytest.raises(bastion.InvalidArgument, match="argument owner must not contain NUL"):
            await w.admin.files.unshare(name="a", owner="alice\x00", user="bob")
        with pytest.raises(bastion.InvalidArgument, match="argument user must not contain NUL"):
            await w.admin.files.usage(user="alice\x00")
        assert (await w.alice.files.stat(name="a"))["size"] == 1  # untouched

    run(test, tmp_path)


def test_names_are_validated() -> None:
    assert check_name("reports/q3.pdf") == "reports/q3.pdf"
    assert check_name("café/日本語 ü\u00a0x") == "café/日本語 ü\u00a0x"  # non-ASCII text is fine
    bad_names = ("", "/abs", "a/../b", "a//b", "trailing/", ".", "nul\x00byte", "x" * 1025, "tab\there", "del\x7f")
    for bad in (*bad_names, "csi\x9b2J", "next\x85line", "c1\x80"):  # C1 controls too (they were accepted)
        with pytest.raises(bastion.InvalidArgument):
            check_name(bad)


def test_name_conflicts_overwrite_and_rename(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        first = await w.put(w.alice, "n", b"one")
        with pytest.raises(bastion.AlreadyExists):
            await w.alice.files.begin_upload(name="n", size=3, sha256=sha(b"two"))
        second = await w.put(w.alice, "n", b"two", overwrite=True)
        assert second["id"] == first["id"] and await w.get(w.alice, name="n") == b"two"
        await w.put(w.alice, "m", b"m")
        with pytest.raises(bastion.AlreadyExists):
            await w.alice.files.rename(name="m", new_name="n")
        renamed = await w.alice.files.rename(name="m", new_name="dir/m2")
        assert renamed["name"] == "dir/m2"
        with pytest.raises(bastion.InvalidArgument):
            await w.alice.files.begin_upload(name="../etc/passwd", size=1, sha256=sha(b"x"))

    run(test, tmp_path)


def test_blobs_are_shared_and_swept_only_after_the_grace_period(tmp_path: Path) -> None:
    config = FilesConfig(quota_bytes=10_000_000, chunk_bytes=CHUNK, blob_grace=100.0, sweep_interval=3600)

    async def test(w: World) -> None:
        data = b"same contents"
        a = await w.put(w.alice, "a", data)
        await w.put(w.bob, "b", data)
        assert len(w.blobs()) == 1
        await w.alice.files.delete(file_id=a["id"])
        await w.bob.files.delete(name="b")
        now = time.time()
        assert (await w.files.sweep(now))["blobs_deleted"] == 0
        assert len(w.blobs()) == 1  # within the grace period a backup may still want it
        assert (await w.files.sweep(now + 101))["blobs_deleted"] == 0  # pinned by the last commit
        assert (await w.files.sweep(now + PIN_SECONDS + 1))["blobs_deleted"] == 1
        assert w.blobs() == []
        # The same contents uploaded again come back.
        await w.put(w.alice, "again", data)
        assert await w.get(w.alice, name="again") == data

    run(test, tmp_path, config)


def test_sweep_expires_idle_uploads_and_orphans(tmp_path: Path) -> None:
    config = FilesConfig(quota_bytes=10_000, chunk_bytes=CHUNK, upload_ttl=50.0)

    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="x", size=100, sha256=sha(b"x" * 100))
        await w.alice.upload("files.upload", [b"x" * 10], upload_id=info["upload_id"])
        orphan = w.directory / "uploads" / ("u-" + "1" * 32)
        orphan.write_bytes(b"left behind")
        os.utime(orphan, (0, 0))
        now = time.time()
        counts = await w.files.sweep(now + 60)
        assert counts == {"uploads_expired": 1, "blobs_deleted": 0, "orphans_removed": 1}
        assert list((w.directory / "uploads").iterdir()) == []
        assert (await w.alice.files.usage())["reserved_bytes"] == 0
        with pytest.raises(bastion.NotFound):
            await w.alice.files.upload_status(upload_id=info["upload_id"])

    run(test, tmp_path, config)


async def offset_reaches(client: bastion.Client, upload_id: str, offset: int, timeout: float = 10.0) -> None:
    """Poll ``upload_status`` (with a deadline) until the server holds ``offset`` bytes of the upload."""
    deadline = time.monotonic() + timeout
    while (await client.files.upload_status(upload_id=upload_id))["offset"] < offset:
        assert time.monotonic() < deadline, f"upload {upload_id} never reached offset {offset}"
        await asyncio.sleep(0.01)


def test_an_upload_cancelled_while_its_bytes_arrive_ends_not_found(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)

    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="x", size=len(data), sha256=sha(data))
        go_on = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield data[:CHUNK]
            await go_on.wait()
            for chunk in chunks(data[CHUNK:]):
                yield chunk

        upload = asyncio.create_task(w.alice.upload("files.upload", slow(), upload_id=info["upload_id"]))
        await offset_reaches(w.alice, info["upload_id"], CHUNK)
        assert await w.alice.files.cancel_upload(upload_id=info["upload_id"]) is True
        go_on.set()
        with pytest.raises(bastion.NotFound, match="finished, cancelled or expired"):
            await upload  # was INTERNAL: the cancelled upload's file was gone when it was put in place
        with pytest.raises(bastion.NotFound):
            await w.alice.files.stat(name="x")
        assert (await w.alice.files.usage())["reserved_bytes"] == 0
        assert list((w.directory / "uploads").iterdir()) == [] and w.blobs() == []
        assert (await w.put(w.alice, "x", data))["size"] == len(data)  # and the name is free

    run(test, tmp_path)


def test_an_upload_whose_bytes_keep_arriving_does_not_expire(tmp_path: Path) -> None:
    config = FilesConfig(quota_bytes=10_000_000, chunk_bytes=CHUNK, upload_ttl=1.0)
    data = os.urandom(100 * 1024)
    swept: list[dict[str, int]] = []

    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="slow", size=len(data), sha256=sha(data))
        started = time.monotonic()

        async def trickle() -> AsyncIterator[bytes]:  # a slow client: a KiB every 50 ms, for longer than upload_ttl
            for i, chunk in enumerate(chunks(data, 1024)):
                if i and not swept and time.monotonic() - started > 1.5:
                    swept.append(await w.files.sweep())
                yield chunk
                await asyncio.sleep(0.05)

        done = await w.alice.upload("files.upload", trickle(), upload_id=info["upload_id"])
        assert swept == [{"uploads_expired": 0, "blobs_deleted": 0, "orphans_removed": 0}]
        assert done["complete"] and await w.get(w.alice, name="slow") == data

    run(test, tmp_path, config)


def test_the_orphan_scan_skips_an_upload_file_that_vanishes_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload file removed while the sweep scanned the uploads directory (a commit or a cancel removing
    its file between the listing and the stat) raised FileNotFoundError out of the scan, and the sweep's
    whole orphan pass was lost until the next one. The file is removed at exactly that point here: right
    after the listing yields its entry, before the scan stats it."""
    vanishing = "u-" + "2" * 32
    real_scandir = os.scandir

    class Scandir:  # os.scandir's iterator, removing one file right after the listing yields its entry
        def __init__(self, path: Any) -> None:
            self.entries = real_scandir(path)

        def __enter__(self) -> Scandir:
            return self

        def __exit__(self, *exc: object) -> None:
            self.entries.close()

        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            for entry in self.entries:
                if entry.name == vanishing:
                    os.unlink(entry.path)  # gone between the listing and the stat
                yield entry

    async def test(w: World) -> None:
        await w.files.aclose()  # its background sweep stopped: the test's is the only one to scan
        uploads = w.directory / "uploads"
        for upload_id in ("u-" + "1" * 32, vanishing, "u-" + "3" * 32):
            (uploads / upload_id).write_bytes(b"left behind")
            os.utime(uploads / upload_id, (0, 0))
        monkeypatch.setattr(os, "scandir", Scandir)
        counts = await w.files.sweep(time.time())
        monkeypatch.undo()
        assert counts == {"uploads_expired": 0, "blobs_deleted": 0, "orphans_removed": 2}
        assert list(uploads.iterdir()) == []

    run(test, tmp_path)


def test_uploads_belong_to_their_uploader(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="x", size=3, sha256=sha(b"abc"))
        with pytest.raises(bastion.NotFound):
            await w.bob.files.upload_status(upload_id=info["upload_id"])
        # Not bob's to cancel: false, as for an upload that does not exist (a retried cancel's answer).
        assert await w.bob.files.cancel_upload(upload_id=info["upload_id"]) is False
        with pytest.raises(bastion.NotFound):
            await w.bob.upload("files.upload", [b"abc"], upload_id=info["upload_id"])
        with pytest.raises(bastion.NotFound):
            await w.alice.files.upload_status(upload_id="../../etc/passwd")
        assert [u["upload_id"] for u in (await w.alice.files.uploads())["uploads"]] == [info["upload_id"]]
        assert await w.alice.files.cancel_upload(upload_id=info["upload_id"]) is True
        assert (await w.alice.files.uploads())["uploads"] == []

    run(test, tmp_path)


def test_the_owner_sees_and_cancels_uploads_another_user_charged_to_their_quota(tmp_path: Path) -> None:
    """A write share lets bob begin new contents for alice's file, reserving alice's quota: alice must be able
    to find out why her quota is reserved, by whom, and release it -- not wait out upload_ttl."""
    config = FilesConfig(quota_bytes=1000, chunk_bytes=CHUNK)

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"x" * 100)
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        taken = await w.bob.files.begin_upload(file_id=doc["id"], size=900, sha256=sha(b"y" * 900))
        assert (await w.alice.files.usage())["reserved_bytes"] == 900
        with pytest.raises(bastion.ResourceExhausted):
            await w.alice.files.begin_upload(name="mine", size=10, sha256=sha(b"z" * 10))

        listed = (await w.alice.files.uploads())["uploads"]
        assert [(u["upload_id"], u["owner"], u["uploader"], u["size"]) for u in listed] == [
            (taken["upload_id"], "alice", "bob", 900)
        ]
        assert (await w.alice.files.upload_status(upload_id=taken["upload_id"]))["uploader"] == "bob"
        with pytest.raises(bastion.NotFound):  # the owner may stop it, not send its bytes
            await w.alice.upload("files.upload", [b"y" * 900], upload_id=taken["upload_id"])
        assert await w.alice.files.cancel_upload(upload_id=taken["upload_id"]) is True
        assert (await w.alice.files.usage())["reserved_bytes"] == 0
        assert (await w.bob.files.uploads())["uploads"] == []
        with pytest.raises(bastion.NotFound):
            await w.bob.upload("files.upload", [b"y" * 900], upload_id=taken["upload_id"])
        await w.alice.files.begin_upload(name="mine", size=10, sha256=sha(b"z" * 10))
        # Carol, a stranger to both, still sees none of it.
        assert (await w.carol.files.uploads())["uploads"] == []

    run(test, tmp_path, config)


def test_empty_file_and_download_guards(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        empty = await w.put(w.alice, "empty", b"")
        assert empty["size"] == 0 and await w.get(w.alice, name="empty") == b""
        await w.put(w.alice, "f", b"hello")
        with pytest.raises(bastion.FailedPrecondition, match="other contents"):
            await w.get(w.alice, name="f", sha256=sha(b"something else"))
        with pytest.raises(bastion.OutOfRange):
            await w.get(w.alice, name="f", offset=6)
        assert await w.get(w.alice, name="f", offset=5) == b""
        with pytest.raises(bastion.InvalidArgument):
            await w.alice.files.stat(name="f", file_id=empty["id"])

    run(test, tmp_path)


def test_a_share_names_an_existing_user(tmp_path: Path) -> None:
    """A share to a user name nobody holds yet was accepted, and whoever registered that name later could
    read (or write) the file. It is refused now (when the credential store holds users: the server's
    principals are its users); a role, which no table lists, is not checked."""

    async def test(w: World) -> None:
        users = w.files.users
        assert users is not None
        for user in USERS:
            await users.create_user(user)
        doc = await w.put(w.alice, "doc", b"secret")
        with pytest.raises(bastion.NotFound, match="no user 'mallory'"):
            await w.alice.files.share(file_id=doc["id"], user="mallory", mode="write")
        assert await w.alice.files.shares(file_id=doc["id"]) == []
        await w.alice.files.share(file_id=doc["id"], role="auditors")  # roles are not registered anywhere
        await users.create_user(User("mallory"))  # registering the name later gives it nothing
        mallory = w.server.client(principal=Principal("mallory"))
        with pytest.raises(bastion.NotFound):
            await mallory.files.stat(file_id=doc["id"])

    run(test, tmp_path)


def test_replacing_contents_can_require_the_contents_it_replaces(tmp_path: Path) -> None:
    """Two writers replacing one file: the later commit silently overwrote the earlier one's contents.
    ``expected_sha256`` makes the replacement a compare-and-swap (ABORTED, as kv's expected_version)."""
    v1, v2, mine = b"version one", b"version two", b"my edit of version one"

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", v1)
        ref = {"file_id": doc["id"]}
        with pytest.raises(bastion.Aborted, match="now has other contents"):  # wrong from the start: at once
            await w.alice.files.begin_upload(**ref, size=len(mine), sha256=sha(mine), expected_sha256=sha(v2))
        slow = await w.alice.files.begin_upload(**ref, size=len(mine), sha256=sha(mine), expected_sha256=sha(v1))
        assert slow["expected_sha256"] == sha(v1)
        await w.put(w.alice, "doc", v2, overwrite=True)  # another writer gets there first
        with pytest.raises(bastion.Aborted, match="now has other contents"):
            await w.alice.upload("files.upload", [mine], upload_id=slow["upload_id"])
        assert await w.get(w.alice, **ref) == v2
        assert (await w.alice.files.uploads())["uploads"] == [] and (await w.alice.files.usage())["reserved_bytes"] == 0
        # The contents it expects: the swap happens, by id or by name with overwrite.
        done = await w.put(w.alice, "doc", mine, overwrite=True, expected_sha256=sha(v2))
        assert done["id"] == doc["id"] and await w.get(w.alice, **ref) == mine
        info = await w.alice.files.begin_upload(**ref, size=len(v1), sha256=sha(v1), expected_sha256=sha(mine))
        assert (await w.alice.upload("files.upload", [v1], upload_id=info["upload_id"]))["complete"]
        with pytest.raises(bastion.Aborted, match="no file"):  # overwrite expecting a file that is not there
            await w.alice.files.begin_upload(
                name="new", size=1, sha256=sha(b"x"), overwrite=True, expected_sha256=sha(v1)
            )
        with pytest.raises(bastion.InvalidArgument, match="expected_sha256"):
            await w.alice.files.begin_upload(name="new", size=1, sha256=sha(b"x"), expected_sha256=sha(v1))

    run(test, tmp_path)


def test_uploads_come_in_pages(tmp_path: Path) -> None:
    """``uploads`` answered every open upload charged to the caller at once: grantees of a write share to a
    role each hold up to max_open_uploads, so the answer had no bound. It pages now, as ``list`` does."""

    async def test(w: World) -> None:
        began = [
            (await w.alice.files.begin_upload(name=f"u{i}", size=1, sha256=sha(b"x")))["upload_id"] for i in range(5)
        ]
        seen, after, pages = [], None, 0
        while True:
            page = await w.alice.files.uploads(limit=2, after=after)
            seen += [u["upload_id"] for u in page["uploads"]]
            pages += 1
            if page["next"] is None:
                break
            after = page["next"]
        assert seen == began and pages == 3  # oldest first
        assert (await w.alice.files.uploads())["next"] is None
        with pytest.raises(bastion.InvalidArgument, match="limit"):
            await w.alice.files.uploads(limit=0)
        with pytest.raises(bastion.InvalidArgument, match="after"):
            await w.alice.files.uploads(after="not a cursor")

    run(test, tmp_path)


def test_contents_uploaded_again_mend_a_decayed_blob_of_the_same_sha256(tmp_path: Path) -> None:
    """A blob already there with the right size was trusted as it was: one decayed in place (a flipped bit)
    kept being served, to the new file too, although the upload had just brought verified contents."""
    data = os.urandom(100_000)

    async def test(w: World) -> None:
        first = await w.put(w.alice, "first", data)
        blob = w.directory / "blobs" / sha(data)[:2] / sha(data)
        decayed = bytearray(blob.read_bytes())
        decayed[50_000] ^= 0x01
        blob.write_bytes(bytes(decayed))
        second = await w.put(w.bob, "second", data)
        assert second["sha256"] == first["sha256"] == sha(data)
        assert blob.read_bytes() == data
        assert await w.get(w.bob, name="second") == data and await w.get(w.alice, name="first") == data
        assert blob.stat().st_mode & 0o777 == 0o600 and list((w.directory / "uploads").iterdir()) == []
        assert [p.name for p in blob.parent.iterdir()] == [sha(data)]  # no spare name left behind

    run(test, tmp_path)
