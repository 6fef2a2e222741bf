"""The files service under pressure: bounds on uploads, withdrawn shares, racing uploads, a failing store, resumes
(real stores, both backends)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

import bastion
from bastion.config import FilesConfig
from bastion.security.principal import Principal
from bastion.services.files import Files
from bastion.store import open_store
from bastion.testing import MemoryServer
from tests.services.test_files import CHUNK, USERS, World, chunks, offset_reaches, run, sha
from tests.support.stores import service_store

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
        first = (await w.alice.files.uploads())["uploads"][0]
        await w.alice.files.cancel_upload(upload_id=first["upload_id"])
        await w.alice.files.begin_upload(name="e3", size=0, sha256=sha(b""))

    run(test, tmp_path, config)


def test_an_owner_holds_at_most_max_files(tmp_path: Path) -> None:
    """Only bytes were bounded: empty files cost no quota, so one user could make rows without end."""
    config = FilesConfig(quota_bytes=10_000, chunk_bytes=CHUNK, max_files=3)

    async def test(w: World) -> None:
        a = await w.put(w.alice, "a", b"")
        await w.put(w.alice, "b", b"")
        pending = await w.alice.files.begin_upload(name="c", size=0, sha256=sha(b""))  # an upload of a new name
        with pytest.raises(bastion.ResourceExhausted, match=r"3 files or uploads of new ones.*files\.max_files"):
            await w.alice.files.begin_upload(name="d", size=0, sha256=sha(b""))
        await w.put(w.alice, "a", b"new", overwrite=True)  # replacing adds no file
        await w.alice.files.share(file_id=a["id"], user="bob", mode="write")
        info = await w.bob.files.begin_upload(file_id=a["id"], size=1, sha256=sha(b"x"))
        assert (await w.bob.upload("files.upload", [b"x"], upload_id=info["upload_id"]))["complete"]
        await w.put(w.bob, "bobs", b"")  # per owner
        await w.alice.files.cancel_upload(upload_id=pending["upload_id"])
        await w.put(w.alice, "d", b"")
        with pytest.raises(bastion.ResourceExhausted, match=r"files\.max_files"):
            await w.put(w.alice, "e", b"")
        await w.alice.files.delete(name="b")
        await w.put(w.alice, "e", b"")

    run(test, tmp_path, config)


def test_the_limits_are_validated_at_load() -> None:
    for bad in ({"max_open_uploads": 0}, {"max_grantee_reserved_bytes": -1}, {"max_files": 0}):
        with pytest.raises(bastion.UsageError, match=next(iter(bad))):
            FilesConfig(**bad)  # type: ignore[arg-type]


def test_unsharing_cancels_the_grantees_uploads_and_releases_the_reservation(tmp_path: Path) -> None:
    config = FilesConfig(quota_bytes=10_000, chunk_bytes=CHUNK)

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"x" * 100)
        ref = {"file_id": doc["id"]}
        await w.alice.files.share(**ref, user="bob", mode="write")
        await w.alice.files.share(**ref, role="team", mode="write")
        bobs = await w.bob.files.begin_upload(**ref, size=3_000, sha256=sha(b"y" * 3_000))
        await w.bob.upload("files.upload", [b"y" * 1_000], upload_id=bobs["upload_id"])
        carols = await w.carol.files.begin_upload(**ref, size=2_000, sha256=sha(b"c" * 2_000))
        admins = await w.admin.files.begin_upload(**ref, size=1_000, sha256=sha(b"a" * 1_000))
        assert (await w.alice.files.usage())["reserved_bytes"] == 6_000

        assert await w.alice.files.unshare(**ref, user="bob") is True
        assert (await w.alice.files.usage())["reserved_bytes"] == 3_000
        assert (await w.bob.files.uploads())["uploads"] == []
        assert not (w.directory / "uploads" / bobs["upload_id"]).exists()
        with pytest.raises(bastion.NotFound):
            await w.bob.files.upload_status(upload_id=bobs["upload_id"])

        # Carol's write access came through a role: withdrawing it cancels hers; the admin's stays.
        assert await w.alice.files.unshare(**ref, role="team") is True
        assert [u["upload_id"] for u in (await w.alice.files.uploads())["uploads"]] == [admins["upload_id"]]
        with pytest.raises(bastion.NotFound):
            await w.carol.files.upload_status(upload_id=carols["upload_id"])
        assert (await w.alice.files.usage())["reserved_bytes"] == 1_000

    run(test, tmp_path, config)


def test_a_grantee_that_keeps_write_access_another_way_keeps_its_upload(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"x" * 100)
        ref = {"file_id": doc["id"]}
        await w.alice.files.share(**ref, user="carol", mode="write")
        await w.alice.files.share(**ref, role="team", mode="write")
        carols = await w.carol.files.begin_upload(**ref, size=10, sha256=sha(b"c" * 10))
        await w.alice.files.unshare(**ref, user="carol")  # still a writer through the role "team"
        done = await w.carol.upload("files.upload", [b"c" * 10], upload_id=carols["upload_id"])
        assert done["complete"]

    run(test, tmp_path)


def test_unsharing_during_a_grantees_stream_ends_it_without_replacing_the_file(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"original")
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        info = await w.bob.files.begin_upload(file_id=doc["id"], size=len(data), sha256=sha(data))
        go_on = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield data[:CHUNK]
            await go_on.wait()
            for chunk in chunks(data[CHUNK:]):
                yield chunk

        upload = asyncio.create_task(w.bob.upload("files.upload", slow(), upload_id=info["upload_id"]))
        await offset_reaches(w.bob, info["upload_id"], CHUNK)
        await w.alice.files.unshare(file_id=doc["id"], user="bob")
        go_on.set()
        with pytest.raises(bastion.NotFound):
            await upload
        assert await w.get(w.alice, file_id=doc["id"]) == b"original"
        assert (await w.alice.files.usage())["reserved_bytes"] == 0

    run(test, tmp_path)


def test_an_uploader_who_lost_write_access_otherwise_gives_the_reservation_back_on_its_next_call(
    tmp_path: Path,
) -> None:
    """Write access can also go without an unshare (a role taken from the user): the upload cannot finish."""

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"x" * 100)
        await w.alice.files.share(file_id=doc["id"], role="team", mode="write")
        info = await w.carol.files.begin_upload(file_id=doc["id"], size=10, sha256=sha(b"c" * 10))
        carol_now = w.server.client(principal=Principal("carol"))  # no longer in "team"
        with pytest.raises(bastion.NotFound):
            await carol_now.upload("files.upload", [b"c" * 10], upload_id=info["upload_id"])
        assert (await w.alice.files.usage())["reserved_bytes"] == 0
        assert (await w.alice.files.uploads())["uploads"] == []

    run(test, tmp_path)


def test_a_store_failure_at_the_last_step_keeps_the_finished_upload_for_a_retry(tmp_path: Path) -> None:
    """The bytes were verified and in place when the store failed to record the file: the upload was dropped
    with them, and a client retrying offset=size (as UNAVAILABLE invites) had to send the whole file again.
    A real failure: the server's PostgreSQL sessions have a lock_timeout, and the files table is locked."""
    location = service_store(tmp_path)
    if not location.startswith("postgresql"):
        pytest.skip("needs PostgreSQL's LOCK TABLE and lock_timeout")
    data = os.urandom(3 * CHUNK)

    async def main() -> None:
        async with open_store(location + "&lock_timeout=500") as store:
            files = Files(store, tmp_path / "files", FilesConfig(chunk_bytes=CHUNK), leader=False)
            await files.start()
            async with MemoryServer([files.service]) as server:
                await asyncio.wait_for(test(World(server, files, tmp_path / "files")), 20)

    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="big", size=len(data), sha256=sha(data))
        part = await w.alice.upload("files.upload", chunks(data[:-1]), upload_id=info["upload_id"])
        assert part["offset"] == len(data) - 1
        locker = await asyncpg.connect(location)
        try:
            async with locker.transaction():
                await locker.execute("LOCK TABLE files IN ACCESS EXCLUSIVE MODE")  # recording the file times out
                with pytest.raises(bastion.Unavailable, match="lock timeout"):
                    await w.alice.upload("files.upload", [data[-1:]], upload_id=info["upload_id"], offset=len(data) - 1)
        finally:
            await locker.close()
        status = await w.alice.files.upload_status(upload_id=info["upload_id"])
        assert status["offset"] == len(data)
        done = await w.alice.upload("files.upload", [], upload_id=info["upload_id"], offset=len(data))
        assert done["complete"] and await w.get(w.alice, name="big") == data
        assert list((w.directory / "uploads").iterdir()) == []
        assert (await w.alice.files.usage())["reserved_bytes"] == 0

    asyncio.run(main())


def test_two_uploads_racing_for_one_new_name_leave_one_file_and_nothing_behind(tmp_path: Path) -> None:
    one, two = os.urandom(2 * CHUNK), os.urandom(2 * CHUNK)

    async def test(w: World) -> None:
        first = await w.alice.files.begin_upload(name="same", size=len(one), sha256=sha(one))
        second = await w.alice.files.begin_upload(name="same", size=len(two), sha256=sha(two))
        results = await asyncio.gather(
            w.alice.upload("files.upload", chunks(one), upload_id=first["upload_id"]),
            w.alice.upload("files.upload", chunks(two), upload_id=second["upload_id"]),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, dict)]
        assert len(won) == 1 and [type(r) for r in results if not isinstance(r, dict)] == [bastion.AlreadyExists]
        assert await w.get(w.alice, name="same") in (one, two)
        assert (await w.get(w.alice, name="same")) == (one if won[0]["upload_id"] == first["upload_id"] else two)
        assert list((w.directory / "uploads").iterdir()) == []
        assert (await w.alice.files.uploads())["uploads"] == []
        usage = await w.alice.files.usage()
        assert (usage["files_bytes"], usage["reserved_bytes"]) == (2 * CHUNK, 0)

    run(test, tmp_path)


def read_bytes() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (page-cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_resuming_does_not_reread_what_the_server_already_hashed(tmp_path: Path) -> None:
    """Every upload call re-read and re-hashed all the bytes already held: one tiny call (an empty stream, or
    one byte) cost the server a read and a SHA-256 of up to the whole quota -- an amplification any user can
    repeat at will."""
    if not Path("/proc/self/io").exists():
        pytest.skip("needs /proc/self/io")
    held = 24 * 1024 * 1024
    data = os.urandom(held + 2)
    config = FilesConfig(quota_bytes=100_000_000, chunk_bytes=CHUNK)

    async def test(w: World) -> None:
        info = await w.alice.files.begin_upload(name="big", size=len(data), sha256=sha(data))
        await w.alice.upload("files.upload", chunks(data[:held]), upload_id=info["upload_id"])
        before = read_bytes()
        for _ in range(3):
            empty = await w.alice.upload("files.upload", [], upload_id=info["upload_id"], offset=held)
            assert empty["offset"] == held
        one = await w.alice.upload("files.upload", [data[held : held + 1]], upload_id=info["upload_id"], offset=held)
        assert one["offset"] == held + 1
        assert read_bytes() - before < held // 4
        done = await w.alice.upload("files.upload", [data[-1:]], upload_id=info["upload_id"], offset=held + 1)
        assert done["complete"] and done["file"]["sha256"] == sha(data)

    run(test, tmp_path, config)


def test_downgrading_a_write_share_to_read_cancels_the_grantees_uploads(tmp_path: Path) -> None:
    """Sharing again with mode="read" withdraws write access as surely as unshare does."""

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"original")
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        info = await w.bob.files.begin_upload(file_id=doc["id"], size=10, sha256=sha(b"b" * 10))
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="read")
        assert (await w.alice.files.usage())["reserved_bytes"] == 0
        with pytest.raises(bastion.NotFound):
            await w.bob.files.upload_status(upload_id=info["upload_id"])
        assert await w.get(w.bob, file_id=doc["id"]) == b"original"

    run(test, tmp_path)


def test_deleting_a_file_cancels_the_uploads_replacing_it_and_releases_their_reservations(tmp_path: Path) -> None:
    """Uploads of new contents for a file outlived its deletion: they could never finish, yet they kept the
    owner's quota reserved until their uploaders' next call or upload_ttl (a day) later."""
    config = FilesConfig(quota_bytes=10_000, chunk_bytes=CHUNK)

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"x" * 100)
        other = await w.put(w.alice, "other", b"o" * 100)
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        await w.alice.files.share(file_id=other["id"], user="bob", mode="write")
        bobs = await w.bob.files.begin_upload(file_id=doc["id"], size=3_000, sha256=sha(b"y" * 3_000))
        await w.bob.upload("files.upload", [b"y" * 1_000], upload_id=bobs["upload_id"])
        alices = await w.alice.files.begin_upload(file_id=doc["id"], size=2_000, sha256=sha(b"a" * 2_000))
        kept = await w.bob.files.begin_upload(file_id=other["id"], size=500, sha256=sha(b"k" * 500))
        assert (await w.alice.files.usage())["reserved_bytes"] == 5_500

        await w.bob.files.delete(file_id=doc["id"])  # a write grantee may delete it
        assert (await w.alice.files.usage())["reserved_bytes"] == 500
        assert [u["upload_id"] for u in (await w.alice.files.uploads())["uploads"]] == [kept["upload_id"]]
        for upload_id in (bobs["upload_id"], alices["upload_id"]):
            assert not (w.directory / "uploads" / upload_id).exists()
        with pytest.raises(bastion.NotFound):
            await w.bob.files.upload_status(upload_id=bobs["upload_id"])

    run(test, tmp_path, config)


def test_cancel_upload_retried_answers_alike_and_tells_nothing_of_others_uploads(tmp_path: Path) -> None:
    """``cancel_upload`` is idempotent, so the client's failover retries it after a lost reply; but the retry
    found the upload gone (the first try had cancelled it) and answered NOT_FOUND, a cancel that worked
    reported as failed. An upload not open for the caller -- cancelled already, finished, expired, never
    begun, or someone else's -- now answers false, all alike; true means this call cancelled it."""
    config = FilesConfig(quota_bytes=10_000, chunk_bytes=CHUNK)

    async def test(w: World) -> None:
        mine = await w.alice.files.begin_upload(name="a", size=10, sha256=sha(b"a" * 10))
        assert await w.alice.files.cancel_upload(upload_id=mine["upload_id"]) is True
        assert await w.alice.files.cancel_upload(upload_id=mine["upload_id"]) is False  # the retry
        assert (await w.alice.files.usage())["reserved_bytes"] == 0

        doc = await w.put(w.alice, "doc", b"x")
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        bobs = await w.bob.files.begin_upload(file_id=doc["id"], size=5, sha256=sha(b"b" * 5))
        # Someone else's upload answers as one that never was, and stays open.
        for upload_id in (bobs["upload_id"], "u-" + "0" * 32, "not an id"):
            assert await w.carol.files.cancel_upload(upload_id=upload_id) is False
        assert (await w.bob.files.upload_status(upload_id=bobs["upload_id"]))["offset"] == 0
        # The owner cancels a grantee's upload; the owner's retry and the uploader's cancel find it gone.
        assert await w.alice.files.cancel_upload(upload_id=bobs["upload_id"]) is True
        assert await w.alice.files.cancel_upload(upload_id=bobs["upload_id"]) is False
        assert await w.bob.files.cancel_upload(upload_id=bobs["upload_id"]) is False
        assert (await w.alice.files.usage())["reserved_bytes"] == 0

        done = await w.alice.files.begin_upload(name="b", size=1, sha256=sha(b"b"))
        assert (await w.alice.upload("files.upload", [b"b"], upload_id=done["upload_id"]))["complete"]
        assert await w.alice.files.cancel_upload(upload_id=done["upload_id"]) is False  # finished: the file stays
        assert await w.get(w.alice, name="b") == b"b"

    run(test, tmp_path, config)


def test_withdrawing_a_share_cancels_the_uploads_of_a_grantee_since_disabled(tmp_path: Path) -> None:
    """Withdrawing a share re-judges the open uploads of new contents for the file, but judged each uploader
    by its user row's roles, not minding that the row was disabled: carol, disabled but still in "team",
    kept her upload and the owner's quota reserved until upload_ttl, though she could send none of it. A
    disabled user can write nothing: withdrawing a share cancels its uploads for the file too."""
    config = FilesConfig(quota_bytes=10_000, chunk_bytes=CHUNK)

    async def test(w: World) -> None:
        users = w.files.users
        assert users is not None
        for user in USERS:
            await users.create_user(user)
        doc = await w.put(w.alice, "doc", b"x" * 100)
        ref = {"file_id": doc["id"]}
        await w.alice.files.share(**ref, role="team", mode="write")
        await w.alice.files.share(**ref, user="bob", mode="write")
        carols = await w.carol.files.begin_upload(**ref, size=1_000, sha256=sha(b"c" * 1_000))
        await w.carol.upload("files.upload", [b"c" * 100], upload_id=carols["upload_id"])
        await w.bob.files.begin_upload(**ref, size=2_000, sha256=sha(b"b" * 2_000))
        assert await users.set_access("carol", frozenset({"team"}), True)  # auth.disable_user(carol)

        assert await w.alice.files.unshare(**ref, user="bob") is True
        assert (await w.alice.files.uploads())["uploads"] == []
        assert (await w.alice.files.usage())["reserved_bytes"] == 0
        assert not (w.directory / "uploads" / carols["upload_id"]).exists()

    run(test, tmp_path, config)


def test_a_disabled_grantee_cannot_commit_new_contents(tmp_path: Path) -> None:
    """The commit's access check read the uploader's row and took a disabled row's roles as none -- but a
    share to the user's own name still granted write, so a disabled user whose session had not yet been
    ended replaced the file. A disabled user has no access at all: the upload ends NOT_FOUND, discarded."""

    async def test(w: World) -> None:
        users = w.files.users
        assert users is not None
        for user in USERS:
            await users.create_user(user)
        doc = await w.put(w.alice, "doc", b"original")
        await w.alice.files.share(file_id=doc["id"], user="carol", mode="write")
        info = await w.carol.files.begin_upload(file_id=doc["id"], size=10, sha256=sha(b"c" * 10))
        assert await users.set_access("carol", frozenset({"team"}), True)  # auth.disable_user(carol)
        with pytest.raises(bastion.NotFound, match="no file"):
            await w.carol.upload("files.upload", [b"c" * 10], upload_id=info["upload_id"])
        assert await w.get(w.alice, file_id=doc["id"]) == b"original"
        assert (await w.alice.files.usage())["reserved_bytes"] == 0

    run(test, tmp_path)


def test_a_share_withdrawn_after_the_last_check_stops_the_commit(tmp_path: Path) -> None:
    """A grantee's write access was checked just before the commit, not in it: a share withdrawn between that
    check and the commit (an unshare has deleted the share row; its pass cancelling the grantee's uploads has
    not reached this one, or skips it: an uploader another replica serves) still let the upload replace the
    file. The withdrawal is made at exactly that point here: as the commit pins the blob, its first step."""

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"original")
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        info = await w.bob.files.begin_upload(file_id=doc["id"], size=10, sha256=sha(b"b" * 10))
        store = w.files.store
        pin = store.files_pin_blob

        async def withdraw_then_pin(sha256: str, size: int, at: float) -> bool:
            assert await store.files_unshare(doc["id"], "user", "bob")  # the unshare's first step, alone
            return await pin(sha256, size, at)

        store.files_pin_blob = withdraw_then_pin  # type: ignore[method-assign]
        try:
            with pytest.raises(bastion.NotFound, match="no file"):
                await w.bob.upload("files.upload", [b"b" * 10], upload_id=info["upload_id"])
        finally:
            del store.files_pin_blob
        assert await w.get(w.alice, file_id=doc["id"]) == b"original"
        assert (await w.alice.files.usage())["reserved_bytes"] == 0
        assert (await w.alice.files.uploads())["uploads"] == []

    run(test, tmp_path)


def test_a_disabled_user_cannot_commit_a_new_file(tmp_path: Path) -> None:
    """The commit's re-check answered early for an upload making a new file (no file to judge access to),
    before it looked whether the uploader had been disabled: a disabled user whose session was not yet
    ended still created the file. A disabled user writes nothing: the upload ends NOT_FOUND, discarded,
    its reservation released, and no file is made."""

    async def test(w: World) -> None:
        users = w.files.users
        assert users is not None
        for user in USERS:
            await users.create_user(user)
        info = await w.carol.files.begin_upload(name="fresh", size=10, sha256=sha(b"c" * 10))
        assert (await w.carol.files.usage())["reserved_bytes"] == 10
        assert await users.set_access("carol", frozenset({"team"}), True)  # auth.disable_user(carol)
        with pytest.raises(bastion.NotFound):
            await w.carol.upload("files.upload", [b"c" * 10], upload_id=info["upload_id"])
        assert (await w.admin.files.list(owner="carol", all=True))["files"] == []
        assert (await w.admin.files.usage(user="carol"))["reserved_bytes"] == 0
        assert not (w.directory / "uploads" / info["upload_id"]).exists()

    run(test, tmp_path)


@pytest.mark.parametrize("withdraw", ["unshare", "share read"])
def test_withdrawing_a_write_share_waits_for_a_commit_holding_the_files_row(tmp_path: Path, withdraw: str) -> None:
    """A grantee's commit reads the file's shares with the file's row locked (FOR UPDATE), but unshare (a plain
    DELETE) and a share made read-only (an upsert) took no lock on that row: between the commit's read of the
    write share and its update, the share could be withdrawn and the withdrawal acknowledged, and the update
    still landed. A withdrawal now takes the file's row lock first, so it waits for a commit holding it (and a
    commit after it reads the share gone). The commit's hold is played by a connection of the test's own."""
    location = service_store(tmp_path)
    if not location.startswith("postgresql"):
        pytest.skip("row locks: SQLite serializes every write transaction")

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"original")
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        committer = await asyncpg.connect(location)
        try:
            async with committer.transaction():  # as files_commit_upload: the row locked, then the shares read
                await committer.execute("SELECT 1 FROM files WHERE id = $1 FOR UPDATE", doc["id"])
                assert await committer.fetchval("SELECT mode FROM file_shares WHERE file_id = $1", doc["id"]) == "write"
                if withdraw == "unshare":
                    call = w.alice.files.unshare(file_id=doc["id"], user="bob")
                else:
                    call = w.alice.files.share(file_id=doc["id"], user="bob", mode="read")
                task = asyncio.ensure_future(call)
                blocked = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
                pid = committer.get_server_pid()
                while not await committer.fetchval(blocked, pid):  # bounded by run()'s deadline
                    assert not task.done(), f"{withdraw} did not wait for the file's row lock: {task.result()}"
                    await asyncio.sleep(0.01)
                assert not task.done()
                assert await committer.fetchval("SELECT mode FROM file_shares WHERE file_id = $1", doc["id"]) == "write"
            await asyncio.wait_for(task, 10)
        finally:
            await committer.close()
        assert [(s["grantee"], s["mode"]) for s in await w.alice.files.shares(file_id=doc["id"])] == (
            [] if withdraw == "unshare" else [("bob", "read")]
        )

    run(test, tmp_path)
