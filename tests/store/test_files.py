"""The ``files`` storage domain, the same on every backend (see conftest.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from bastion.exceptions import AlreadyExists, NotFound, PermissionDenied, ResourceExhausted
from bastion.security.credentials import User
from bastion.services.files import check_name
from bastion.store import PostgresStore, SQLiteStore, Store, open_store
from bastion.store._access import USER_LOCK
from bastion.store.files import PIN_SECONDS, FileShare, UploadRecord
from bastion.store.migrations import MIGRATIONS
from bastion.store.postgres import POSTGRES_MIGRATIONS
from tests.support.stores import store_location

SHA_A = "a" * 64
SHA_B = "b" * 64
T0 = 1_000_000.0


def upload(
    upload_id: str,
    owner: str = "alice",
    name: str = "doc",
    size: int = 10,
    sha256: str = SHA_A,
    *,
    file_id: str | None = None,
    overwrite: bool = False,
    uploader: str | None = None,
    at: float = T0,
) -> UploadRecord:
    return UploadRecord(upload_id, owner, uploader or owner, name, size, sha256, file_id, overwrite, at, at)


async def make_file(store: Store, upload_id: str, file_id: str, **kw: object) -> str:
    record = upload(upload_id, **kw)  # type: ignore[arg-type]
    await store.files_begin_upload(record, quota=10**12)
    assert await store.files_pin_blob(record.sha256, record.size, T0)
    return (await store.files_commit_upload(upload_id, file_id, T0)).id


async def test_commit_turns_an_upload_into_a_file(store: Store) -> None:
    await store.files_begin_upload(upload("u1"), quota=100)
    assert (await store.files_get_upload("u1")) == upload("u1")
    assert await store.files_usage("alice") == (0, 10)
    assert await store.files_pin_blob(SHA_A, 10, T0)
    record = await store.files_commit_upload("u1", "f1", T0 + 1)
    assert (record.id, record.owner, record.name, record.size, record.sha256) == ("f1", "alice", "doc", 10, SHA_A)
    assert await store.files_get("f1") == record
    assert await store.files_get_by_name("alice", "doc") == record
    assert await store.files_get_upload("u1") is None
    assert await store.files_usage("alice") == (10, 0)
    with pytest.raises(NotFound):
        await store.files_commit_upload("u1", "f2", T0)


async def test_quota_is_checked_and_reserved_atomically(store: Store) -> None:
    await store.files_begin_upload(upload("u1", size=60), quota=100)
    with pytest.raises(ResourceExhausted, match=r"60 bytes used or reserved \+ 50 requested > limit 100"):
        await store.files_begin_upload(upload("u2", name="other", size=50), quota=100)
    # Concurrent reservations cannot together pass the quota.
    results = await asyncio.gather(
        *(store.files_begin_upload(upload(f"c{i}", name=f"n{i}", size=10), quota=100) for i in range(8)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 4
    assert all(r is None or isinstance(r, ResourceExhausted) for r in results)
    assert await store.files_usage("alice") == (0, 100)


async def test_names_are_unique_per_owner_unless_overwriting(store: Store) -> None:
    await make_file(store, "u1", "f1")
    with pytest.raises(AlreadyExists):
        await store.files_begin_upload(upload("u2"), quota=100)
    await store.files_begin_upload(upload("u3", owner="bob"), quota=100)  # another owner's namespace
    await store.files_begin_upload(upload("u4", sha256=SHA_B, size=5, overwrite=True), quota=100)
    assert await store.files_pin_blob(SHA_B, 5, T0)
    replaced = await store.files_commit_upload("u4", "ignored", T0 + 5)
    assert (replaced.id, replaced.sha256, replaced.size, replaced.updated_at) == ("f1", SHA_B, 5, T0 + 5)
    with pytest.raises(NotFound):
        await store.files_begin_upload(upload("u5", file_id="missing"), quota=100)


async def test_list_filters_by_viewer_shares_prefix_and_pages(store: Store) -> None:
    for i, (owner, name) in enumerate(
        [("alice", "a/1"), ("alice", "a/2"), ("alice", "b"), ("bob", "x"), ("carol", "y")]
    ):
        await make_file(store, f"u{i}", f"f{i}", owner=owner, name=name)
    await store.files_share(FileShare("f3", "user", "alice", "read", T0))
    await store.files_share(FileShare("f4", "role", "team", "write", T0))
    seen = await store.files_list(viewer="alice")
    assert [(f.owner, f.name) for f in seen] == [("alice", "a/1"), ("alice", "a/2"), ("alice", "b"), ("bob", "x")]
    with_role = await store.files_list(viewer="alice", roles=frozenset({"team"}))
    assert [f.id for f in with_role] == ["f0", "f1", "f2", "f3", "f4"]
    assert [f.name for f in await store.files_list(viewer="alice", prefix="a/")] == ["a/1", "a/2"]
    assert [f.name for f in await store.files_list(viewer="alice", prefix="A/")] == []
    assert [f.name for f in await store.files_list(viewer="alice", prefix="a%")] == []
    page = await store.files_list(viewer=None, limit=2, after=("alice", "a/2"))
    assert [f.id for f in page] == ["f2", "f3"]
    assert [f.id for f in await store.files_list(viewer=None, owner="carol")] == ["f4"]


async def test_shares_add_replace_remove_and_go_with_the_file(store: Store) -> None:
    await make_file(store, "u1", "f1")
    await store.files_share(FileShare("f1", "user", "bob", "read", T0))
    await store.files_share(FileShare("f1", "user", "bob", "write", T0 + 1))
    await store.files_share(FileShare("f1", "role", "ops", "read", T0))
    assert [(s.kind, s.grantee, s.mode) for s in await store.files_shares("f1")] == [
        ("role", "ops", "read"),
        ("user", "bob", "write"),
    ]
    with pytest.raises(NotFound):
        await store.files_share(FileShare("nope", "user", "bob", "read", T0))
    assert await store.files_unshare("f1", "role", "ops") is True
    assert await store.files_unshare("f1", "role", "ops") is False
    deleted = await store.files_delete("f1", T0)
    assert deleted is not None and deleted.id == "f1"
    assert await store.files_shares("f1") == []
    assert await store.files_delete("f1", T0) is None


async def test_rename(store: Store) -> None:
    await make_file(store, "u1", "f1", name="one")
    await make_file(store, "u2", "f2", name="two", sha256=SHA_B)
    with pytest.raises(AlreadyExists):
        await store.files_rename("f1", "two", T0)
    assert (await store.files_rename("f1", "three", T0 + 1)).name == "three"
    with pytest.raises(NotFound):
        await store.files_rename("nope", "x", T0)


async def test_blobs_are_claimed_only_when_unreferenced_past_grace_and_unpinned(store: Store) -> None:
    await make_file(store, "u1", "f1")
    await make_file(store, "u2", "f2", owner="bob")  # same contents, one blob
    now = T0 + PIN_SECONDS + 10
    assert await store.files_claim_blobs(now, 100, "s1") == []
    await store.files_delete("f1", now)
    assert await store.files_claim_blobs(now + 1000, 100, "s1") == []  # bob's file still names it
    await store.files_delete("f2", now)
    assert await store.files_claim_blobs(now + 50, 100, "s1") == []  # within the grace period
    assert await store.files_blob_referenced(SHA_A)
    assert await store.files_claim_blobs(now + 101, 100, "s1") == [SHA_A]
    assert await store.files_claim_blobs(now + 102, 100, "s2") == []  # one claim at a time
    assert not await store.files_pin_blob(SHA_A, 10, now + 102)  # being deleted: the committer waits
    assert await store.files_forget_blobs("s2", [SHA_A]) == 0
    assert await store.files_forget_blobs("s1", [SHA_A]) == 1
    assert not await store.files_blob_referenced(SHA_A)
    assert await store.files_pin_blob(SHA_A, 10, now + 103)


async def test_a_crashed_sweeps_claim_is_taken_over(store: Store) -> None:
    await make_file(store, "u1", "f1")
    await store.files_delete("f1", T0)
    later = T0 + PIN_SECONDS + 1
    assert await store.files_claim_blobs(later, 0, "crashed") == [SHA_A]
    assert await store.files_claim_blobs(later + 1, 0, "next") == []
    assert await store.files_claim_blobs(later + 1000, 0, "next") == [SHA_A]
    assert await store.files_forget_blobs("next", [SHA_A]) == 1


async def test_uploads_touch_list_expire(store: Store) -> None:
    await store.files_begin_upload(upload("u1", at=T0), quota=100)
    await store.files_begin_upload(upload("u2", name="two", at=T0 + 1, uploader="bob"), quota=100)
    assert [u.id for u in await store.files_list_uploads("alice")] == ["u1"]
    assert [u.id for u in await store.files_list_uploads(None)] == ["u1", "u2"]
    # u2 is bob's upload charged to alice: hers to see with charged=True, not bob's owner view of anything.
    assert [u.id for u in await store.files_list_uploads("alice", charged=True)] == ["u1", "u2"]
    assert [u.id for u in await store.files_list_uploads("bob")] == ["u2"]
    assert [u.id for u in await store.files_list_uploads("bob", charged=True)] == ["u2"]
    assert await store.files_list_uploads("carol", charged=True) == []
    assert await store.files_touch_upload("u1", T0 + 100)
    assert await store.files_expire_uploads(T0 + 50) == ["u2"]
    assert await store.files_delete_upload("u1") is True
    assert await store.files_delete_upload("u1") is False


async def test_reassign_owner_hands_over_or_deletes(store: Store) -> None:
    await make_file(store, "u1", "f1", owner="old", name="a")
    await make_file(store, "u2", "f2", owner="old", name="clash", sha256=SHA_B)
    await make_file(store, "u3", "f3", owner="new", name="clash", sha256=SHA_B)
    await make_file(store, "u4", "f4", owner="third", name="t")
    await store.files_share(FileShare("f4", "user", "old", "read", T0))
    await store.files_begin_upload(upload("u5", owner="old", name="pending"), quota=100)
    assert await store.files_reassign_owner("old", "new") == 2
    assert [(f.id, f.name) for f in await store.files_list(viewer=None, owner="new")] == [
        ("f1", "a"),
        ("f3", "clash"),
        ("f2", "clash~f2"),
    ]
    assert await store.files_shares("f4") == []  # a recreated "old" inherits nothing
    assert await store.files_get_upload("u5") is None
    assert await store.files_reassign_owner("new", None) == 3
    assert await store.files_list(viewer=None, owner="new") == []
    assert await store.files_usage("new") == (0, 0)
    assert await store.files_reassign_owner("nobody", None) == 0


async def test_a_handed_over_name_finds_a_free_name_even_when_the_fallback_is_taken(store: Store) -> None:
    """A handed-over name the heir used became ``<name>~<file id>`` without looking whether the heir used
    that too: the UPDATE broke the names' uniqueness and the whole hand-over failed, so ``auth.delete_user``
    with that heir could never finish -- and the heir, who can read the id of a file shared with it, could
    bring that about by naming a file of its own so. The handed name is now the first free one."""
    await make_file(store, "u1", "f1", owner="old", name="doc")
    await make_file(store, "u2", "f2", owner="new", name="doc")
    await make_file(store, "u3", "f3", owner="new", name="doc~f1")
    await make_file(store, "u4", "f4", owner="new", name="doc~f1~2")
    assert await store.files_reassign_owner("old", "new") == 1
    assert [(f.id, f.name) for f in await store.files_list(viewer=None, owner="new")] == [
        ("f2", "doc"),
        ("f3", "doc~f1"),
        ("f4", "doc~f1~2"),
        ("f1", "doc~f1~3"),
    ]
    assert await store.files_count("new") == 4


async def test_a_handed_over_name_stays_within_the_name_limit(store: Store) -> None:
    """A long name (up to the 1024 UTF-8 bytes a name may have) the heir used became ``<name>~<file id>``,
    35 bytes longer: the heir could then not name it -- stat, download, delete or rename it by name were
    INVALID_ARGUMENT ("at most 1024 bytes") -- nor overwrite it. The name's start is shortened (on a
    character boundary) to make room for the suffix."""
    long = "dir/" + "é" * 510  # 1024 bytes, a 2-byte character at the cut
    await make_file(store, "u1", "f1", owner="old", name=long)
    await make_file(store, "u2", "f2", owner="new", name=long)
    assert await store.files_reassign_owner("old", "new") == 1
    handed = await store.files_get("f1")
    assert handed is not None and handed.owner == "new" and handed.name.endswith("~f1")
    assert len(handed.name.encode()) <= 1024 and long.startswith(handed.name.removesuffix("~f1"))
    assert check_name(handed.name) == handed.name


async def test_files_handed_to_an_heir_keep_none_of_the_old_owners_shares(store: Store) -> None:
    """The shares the old owner had made stayed on the files handed to the heir: people the heir never chose
    kept reading (or writing) the heir's files, and the heir did not know to look."""
    await make_file(store, "u1", "f1", owner="old", name="a")
    await make_file(store, "u2", "f2", owner="keeper", name="k")
    await store.files_share(FileShare("f1", "user", "friend", "write", T0))
    await store.files_share(FileShare("f1", "role", "team", "read", T0))
    await store.files_share(FileShare("f2", "user", "friend", "read", T0))
    assert await store.files_reassign_owner("old", "heir") == 1
    assert await store.files_shares("f1") == []
    assert [(s.kind, s.grantee) for s in await store.files_shares("f2")] == [("user", "friend")]  # not old's
    assert await store.files_list(viewer="friend", roles=frozenset({"team"})) == [await store.files_get("f2")]


async def test_an_uploaders_bounds_hold_under_concurrent_reservations(store: Store) -> None:
    # One uploader, many owners (one lock per owner): the count across owners still holds.
    results = await asyncio.gather(
        *(
            store.files_begin_upload(upload(f"m{i}", owner=f"o{i}", uploader="bob"), 10**9, max_open=3)
            for i in range(8)
        ),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 3
    assert all(r is None or isinstance(r, ResourceExhausted) for r in results)
    # Bytes reserved in one other user's quota; the owner's own uploads are not counted against it.
    await store.files_begin_upload(upload("own", owner="carol", size=90), 10**9, max_grantee=50)
    grants = await asyncio.gather(
        *(
            store.files_begin_upload(upload(f"g{i}", owner="carol", uploader="dan", size=20), 10**9, max_grantee=50)
            for i in range(5)
        ),
        return_exceptions=True,
    )
    assert sum(r is None for r in grants) == 2
    assert await store.files_usage("carol") == (0, 130)


async def _write_rows(backend: str, location: str, rows: list[str]) -> None:
    """Run ``rows`` (SQL) on the store at ``location`` directly, as an older server would have written them."""
    if backend == "sqlite":
        with sqlite3.connect(location) as conn:
            for row in rows:
                conn.execute(row)
        conn.close()
    else:
        conn = await asyncpg.connect(location)
        try:
            for row in rows:
                await conn.execute(row)
        finally:
            await conn.close()


@pytest.mark.parametrize("users", [True, False], ids=["users", "no-users"])
async def test_shares_to_names_no_user_holds_are_dropped_by_migration_18(
    backend: str, tmp_path: Path, users: bool
) -> None:
    """Before 18 the service accepted a share to any valid user name: the ones to names nobody held go --
    where the store keeps users. A store with none serves another authenticator's principals (bastion.testing,
    StaticTokens, a custom one): there every share stands (the first version of 18 dropped them all)."""
    location = store_location(backend, tmp_path, "upgraded")
    old: Store = (
        SQLiteStore(location, migrations=MIGRATIONS[:17])
        if backend == "sqlite"
        else PostgresStore(location, migrations=POSTGRES_MIGRATIONS[:17])
    )
    async with old as store:
        if users:
            await store.create_user(User("bob"))
    # Rows as a server of schema 17 wrote them (this code's uploads need a later schema).
    rows = [
        "INSERT INTO files (id, owner, name, size, sha256, created_at, updated_at) "
        f"VALUES ('f1', 'alice', 'doc', 0, '{SHA_A}', 0, 0)",
        *(
            f"INSERT INTO file_shares (file_id, kind, grantee, mode, created_at) VALUES ('f1', '{k}', '{g}', 'read', 0)"
            for k, g in (("user", "bob"), ("user", "ghost"), ("role", "ghost"))
        ),
    ]
    await _write_rows(backend, location, rows)
    async with open_store(location) as store:
        assert store.schema_version >= 18
        kept = [("role", "ghost"), ("user", "bob"), *([] if users else [("user", "ghost")])]
        assert [(s.kind, s.grantee) for s in await store.files_shares("f1")] == kept


async def test_a_user_share_is_recorded_only_while_its_grantee_is_a_user(store: Store) -> None:
    """The service read the grantee's row and recorded the share in two steps, and nothing tied a share to
    the users table: a share that read the user before ``delete_user`` removed it, and was recorded after
    the shares to that name were dropped, stayed -- and the next user of that name got the file. The insert
    now checks the row in the same statement, and deleting a user row deletes the shares to that name."""
    await store.create_user(User("alice"))
    await store.create_user(User("bob"))
    await make_file(store, "u1", "f1", owner="alice", name="doc")
    with pytest.raises(NotFound, match="no user 'mallory'"):
        await store.files_share(FileShare("f1", "user", "mallory", "read", T0))
    await store.files_share(FileShare("f1", "role", "anything", "read", T0))  # roles are listed nowhere
    with pytest.raises(NotFound, match="no file"):
        await store.files_share(FileShare("nope", "user", "bob", "read", T0))
    # auth.delete_user("bob"): its shares dropped (files_reassign_owner), then -- a share landing between
    # the two steps -- the row deleted.
    await store.files_share(FileShare("f1", "user", "bob", "read", T0))
    await store.files_reassign_owner("bob", None)
    await store.files_share(FileShare("f1", "user", "bob", "write", T0))
    assert await store.delete_user("bob")
    assert [(s.kind, s.grantee) for s in await store.files_shares("f1")] == [("role", "anything")]
    await store.create_user(User("bob"))  # the name's next holder gets nothing
    assert await store.files_list(viewer="bob") == []


async def test_a_store_without_users_records_shares_to_any_name(store: Store) -> None:
    """No user rows at all: the server's principals come from another authenticator, whose names are its
    own business (docs/services.md, files: sharing)."""
    await make_file(store, "u1", "f1", owner="alice", name="doc")
    await store.files_share(FileShare("f1", "user", "tester", "read", T0))
    assert [s.grantee for s in await store.files_shares("f1")] == ["tester"]


async def test_a_share_waits_for_a_user_deletion_in_progress(backend: str, store: Store, tmp_path: Path) -> None:
    """On PostgreSQL a share read the user row as it was before a deletion not yet committed, and recorded
    the share after the deletion's trigger had run: the share outlived the user. It now takes the grantee's
    advisory lock shared (``delete_user`` takes it exclusive before its DELETE), waits for the deletion, and
    is refused; a deletion rolled back lets it through. (SQLite has one writer: nothing to race.)"""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's concurrent transactions")
    await store.create_user(User("alice"))
    await store.create_user(User("bob"))
    await make_file(store, "u1", "f1", owner="alice", name="doc")
    conn = await asyncpg.connect(store_location(backend, tmp_path))
    # Polled outside conn's transaction: pg_stat_activity is read afresh each time (not kept from the first).
    watch = await asyncpg.connect(store_location(backend, tmp_path))
    waiting = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event = 'advisory' AND query LIKE 'SELECT pg_advisory_xact_lock_shared(%'"
    )
    try:
        for mode, commit in (("write", False), ("read", True)):
            deleting = conn.transaction()
            await deleting.start()
            await conn.execute(USER_LOCK, "bob")  # delete_user's transaction
            await conn.execute("DELETE FROM users WHERE name = 'bob'")
            share = asyncio.create_task(store.files_share(FileShare("f1", "user", "bob", mode, T0)))
            deadline = asyncio.get_running_loop().time() + 5
            while not await watch.fetchval(waiting):
                assert not share.done(), "the share did not wait for the deletion"
                assert asyncio.get_running_loop().time() < deadline, "the share never waited for the deletion"
                await asyncio.sleep(0.01)
            if not commit:
                await deleting.rollback()
                await share  # the row stayed: the share is recorded
                assert [s.mode for s in await store.files_shares("f1")] == ["write"]
                await store.files_unshare("f1", "user", "bob")
                continue
            await deleting.commit()
            with pytest.raises(NotFound, match="no user 'bob'"):
                await share
    finally:
        await conn.close()
        await watch.close()
    assert await store.files_shares("f1") == []


async def test_a_share_to_the_last_user_waits_for_its_deletion_and_is_refused(
    backend: str, store: Store, tmp_path: Path
) -> None:
    """PostgreSQL: a share to bob, the store's last user, that waits for bob's deletion (the advisory lock)
    checks the row in a snapshot taken after the wait, with no user rows left at all: "the store keeps no
    users" would let it through after the deletion's trigger dropped the shares to bob, and whoever
    registered "bob" next would get the file. Whether the store keeps users is read before the wait, in the
    lock's own statement (as the key-share lock's statement did: its snapshot predated the wait)."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's concurrent transactions")
    await store.create_user(User("bob"))  # the only user (alice's files need no row: userless_owners)
    await make_file(store, "u1", "f1", owner="alice", name="doc")
    conn = await asyncpg.connect(store_location(backend, tmp_path))
    watch = await asyncpg.connect(store_location(backend, tmp_path))
    waiting = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event = 'advisory' AND query LIKE 'SELECT pg_advisory_xact_lock_shared(%'"
    )
    try:
        deleting = conn.transaction()
        await deleting.start()
        await conn.execute(USER_LOCK, "bob")  # delete_user's transaction
        await conn.execute("DELETE FROM users WHERE name = 'bob'")
        share = asyncio.create_task(store.files_share(FileShare("f1", "user", "bob", "read", T0)))
        deadline = asyncio.get_running_loop().time() + 5
        while not await watch.fetchval(waiting):
            assert not share.done(), "the share did not wait for the deletion"
            assert asyncio.get_running_loop().time() < deadline, "the share never waited for the deletion"
            await asyncio.sleep(0.01)
        await deleting.commit()
        with pytest.raises(NotFound, match="no user 'bob'"):
            await share
    finally:
        await conn.close()
        await watch.close()
    assert await store.files_shares("f1") == []
    await store.files_share(FileShare("f1", "user", "tester", "read", T0))  # a store with no users: any name
    assert [s.grantee for s in await store.files_shares("f1")] == ["tester"]


async def test_a_share_writes_nothing_to_the_user_row(backend: str, store: Store, tmp_path: Path) -> None:
    """PostgreSQL: a share to a user key-share locked the grantee's row (FOR KEY SHARE) to hold off a
    deletion, writing its xmax -- a MultiXact id under concurrent shares -- and dirtying and WAL-logging the
    users page on every share. The advisory lock kv's writes and uploads take leaves the row alone."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's row locks")
    await store.create_user(User("alice"))
    await store.create_user(User("bob"))
    ids = [await make_file(store, f"u{i}", f"f{i}", owner="alice", name=f"doc{i}") for i in range(5)]
    await asyncio.gather(*(store.files_share(FileShare(i, "user", "bob", "read", T0)) for i in ids))
    await store.files_share(FileShare(ids[0], "user", "bob", "write", T0))
    conn = await asyncpg.connect(store_location(backend, tmp_path))
    try:
        assert await conn.fetchval("SELECT xmax::text FROM users WHERE name = 'bob'") == "0"
    finally:
        await conn.close()
    assert [len(await store.files_shares(i)) for i in ids] == [1] * 5


async def test_each_owners_file_count_is_kept_for_max_files(store: Store) -> None:
    """files.max_files counted every file of the owner (COUNT(*) FROM files) at each new-file begin_upload,
    inside the write transaction: about 5 ms at 100k files, under SQLite's one writer lock. Triggers keep
    each owner's count now (migration 21); the check reads one row (and the owner's open uploads)."""
    for i in range(3):
        await make_file(store, f"a{i}", f"fa{i}", owner="alice", name=f"doc{i}")
    await make_file(store, "o1", "fo1", owner="old", name="doc0")  # a name alice has: handed over renamed
    await make_file(store, "o2", "fo2", owner="old", name="other")
    assert (await store.files_count("alice"), await store.files_count("old")) == (3, 2)
    await store.files_delete("fa0", T0)
    await store.files_rename("fa1", "renamed", T0)
    assert await store.files_count("alice") == 2
    assert await store.files_reassign_owner("old", "alice") == 2  # a hand-over may pass the limit
    assert (await store.files_count("alice"), await store.files_count("old")) == (4, 0)
    with pytest.raises(ResourceExhausted, match="holds 4 files"):
        await store.files_begin_upload(upload("n1", name="new"), 10**9, max_files=4)
    await store.files_begin_upload(upload("n1", name="new"), 10**9, max_files=5)  # the open upload counts too
    with pytest.raises(ResourceExhausted, match="holds 5 files"):
        await store.files_begin_upload(upload("n2", name="new2"), 10**9, max_files=5)
    assert await store.files_reassign_owner("alice", None) == 4
    assert await store.files_count("alice") == 0


async def test_migration_21_counts_the_files_already_stored(backend: str, tmp_path: Path) -> None:
    location = store_location(backend, tmp_path, "counted")
    old: Store = (
        SQLiteStore(location, migrations=MIGRATIONS[:20])
        if backend == "sqlite"
        else PostgresStore(location, migrations=POSTGRES_MIGRATIONS[:20])
    )
    async with old:
        pass
    rows = [
        "INSERT INTO files (id, owner, name, size, sha256, created_at, updated_at) "
        f"VALUES ('f{i}', '{owner}', 'n{i}', 0, '{SHA_A}', 0, 0)"
        for i, owner in enumerate(["alice", "alice", "bob"])
    ]
    await _write_rows(backend, location, rows)
    async with open_store(location) as store:
        assert store.schema_version >= 21
        assert [await store.files_count(o) for o in ("alice", "bob", "carol")] == [2, 1, 0]


async def test_a_grantees_commit_checks_its_write_share_in_its_own_transaction(store: Store) -> None:
    """A grantee's write access was checked by the service before the commit, not in it: a share withdrawn in
    between still let the upload replace the file. ``grantee_roles`` makes the commit read the shares itself."""
    await make_file(store, "u0", "f1")
    await store.files_share(FileShare("f1", "user", "bob", "write", T0))
    await store.files_share(FileShare("f1", "role", "team", "write", T0))
    for upload_id, uploader in (("ub", "bob"), ("uc", "carol")):
        await store.files_begin_upload(upload(upload_id, sha256=SHA_B, file_id="f1", uploader=uploader), quota=100)
    assert await store.files_pin_blob(SHA_B, 10, T0)
    assert await store.files_unshare("f1", "user", "bob")
    with pytest.raises(NotFound, match="no file 'f1'"):
        await store.files_commit_upload("ub", "ignored", T0 + 1, grantee_roles=frozenset({"other"}))
    await store.files_share(FileShare("f1", "user", "bob", "read", T0))
    with pytest.raises(PermissionDenied, match="read-only share"):
        await store.files_commit_upload("ub", "ignored", T0 + 1, grantee_roles=frozenset())
    record = await store.files_get("f1")
    assert record is not None and record.sha256 == SHA_A  # nothing changed: the upload is the caller's to discard
    assert await store.files_get_upload("ub") is not None
    # Through a role the uploader still holds, and a write share still there: the commit goes ahead.
    replaced = await store.files_commit_upload("uc", "ignored", T0 + 2, grantee_roles=frozenset({"team"}))
    assert (replaced.id, replaced.sha256) == ("f1", SHA_B)
