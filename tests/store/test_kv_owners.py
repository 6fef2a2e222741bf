"""A kv write into a personal namespace ``~NAME`` commits only while user NAME has a row (if the store keeps
users): the check of the service (``kv.namespace_for``) comes before the write commits, and a write whose
commit came after the whole of ``auth.delete_user`` (both of its hand-over passes) left keys in ``~NAME``
with no user, found by whoever was given the name next. The write's own transaction checks now."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from bastion.exceptions import NotFound
from bastion.security.credentials import User
from bastion.store import Store, open_store
from bastion.store._access import USER_LOCK, USER_LOCK_SHARED
from bastion.store.kv import KVWrite
from tests.support.stores import store_location

NOW = 1_000_000.0


def w(key: str, value: bytes = b"v", expected_version: int | None = None) -> KVWrite:
    return KVWrite(key, value, "", expected_version, None)


@pytest.fixture(autouse=True)
def _checked(store: Store) -> None:
    """``bastion serve``'s setting: a write to ~NAME is checked (the library default takes principals with no row)."""
    store.userless_owners = False


async def _delete_user(store: Store, name: str) -> None:
    """What ``auth.delete_user`` does to the row and the keys: a pass, the row, a pass again."""
    await store.kv_reassign_owner(name, None)
    assert await store.delete_user(name)
    await store.kv_reassign_owner(name, None)


async def _put_refused_once_a_deletion_commits(
    store: Store, conn: asyncpg.Connection, watch: asyncpg.Connection, waiting: str, deadline: float
) -> None:
    """PostgreSQL: bob's deletion begun on ``conn`` as ``delete_user`` does it, a put to ~bob waits for it (seen
    through ``watch``'s ``waiting`` query) and is refused once the deletion commits."""
    deleting = conn.transaction()
    await deleting.start()
    await conn.execute(USER_LOCK, "bob")  # delete_user's transaction
    await conn.execute("DELETE FROM users WHERE name = 'bob'")
    put = asyncio.create_task(store.kv_put("~bob", [w("a")], NOW))
    while not await watch.fetchval(waiting):
        assert asyncio.get_running_loop().time() < deadline, "the put never waited for the deletion"
        await asyncio.sleep(0.01)
    await deleting.commit()
    with pytest.raises(NotFound, match="no user 'bob'"):
        await put


async def test_a_write_checked_before_its_user_was_deleted_commits_nothing_after(store: Store) -> None:
    for name in ("alice", "bob", "carol"):
        await store.create_user(User(name))
    await store.kv_put("~bob", [w("old")], NOW)
    await asyncio.gather(store.kv_put("~alice", [w("a")], NOW), store.kv_put("~carol", [w("a")], NOW))
    assert await store.get_user("bob") is not None  # the service's check passes...
    await _delete_user(store, "bob")  # ...the whole deletion runs...
    before = await store.kv_revisions()
    for writes in ([w("a")], [w("a"), w("b", b"2")], [w("a", expected_version=0)]):  # ...then the write commits
        with pytest.raises(NotFound, match="no user 'bob': deleted, so ~bob takes no more writes"):
            await store.kv_put("~bob", writes, NOW)
    with pytest.raises(NotFound, match="no user 'bob'"):
        await store.kv_delete("~bob", "old", None, NOW)
    # Among others in one group (SQLite: one batch, run again with each alone): only that put fails.
    results = await asyncio.gather(
        store.kv_put("~alice", [w("x")], NOW), store.kv_put("~bob", [w("a")], NOW),
        store.kv_put("~alice", [w("y")], NOW), return_exceptions=True,
    )  # fmt: skip
    assert isinstance(results[1], NotFound)
    assert results[0] == [before.current + 1] and results[2] == [before.current + 2]
    await store.create_user(User("bob"))  # the name's next holder finds nothing
    assert await store.kv_list("~bob", "", None, 10, NOW) == []
    assert (await store.kv_usage("~bob")).keys == 0
    assert [c.key for c in await store.kv_changes(before.current, None, 10)] == ["x", "y"]
    assert await store.kv_put("~bob", [w("new")], NOW) == [before.current + 3]


async def test_a_store_without_users_takes_writes_to_any_personal_namespace(store: Store) -> None:
    """No user rows at all: the server's principals come from another authenticator (as for files shares)."""
    assert await store.kv_put("~tester", [w("a")], NOW) == [1]
    assert await store.kv_put("~tester", [w("b", expected_version=0)], NOW) == [2]
    assert await store.kv_delete("~tester", "a", None, NOW) == 3
    # Several in one group (SQLite: their owners looked up in one statement).
    assert await asyncio.gather(store.kv_put("~x", [w("a")], NOW), store.kv_put("~y", [w("a")], NOW)) == [[4], [5]]


async def test_a_store_serving_principals_without_users_takes_their_writes(store: Store) -> None:
    """tls.client_subjects = "any": a certificate naming no user owns ~NAME, users or not."""
    await store.create_user(User("alice"))
    with pytest.raises(NotFound, match="no user 'sensor-7'"):
        await store.kv_put("~sensor-7", [w("a")], NOW)
    store.userless_owners = True
    assert await store.kv_put("~sensor-7", [w("a")], NOW) == [1]
    assert await store.kv_put("~sensor-7", [w("b", expected_version=0)], NOW) == [2]
    assert await store.kv_delete("~sensor-7", "a", None, NOW) == 3


async def test_a_put_waits_for_a_user_deletion_in_progress(backend: str, store: Store, tmp_path: Path) -> None:
    """PostgreSQL: the put takes the user's advisory lock shared in its transaction, so it waits for a
    deletion not yet committed (which took it exclusive, as ``delete_user`` does) and is then refused (and a
    deletion waits for a put holding it; SQLite has one writer: nothing to race)."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's concurrent transactions")
    await store.create_user(User("alice"))
    await store.create_user(User("bob"))
    conn = await asyncpg.connect(store_location(backend, tmp_path))
    # Polled outside conn's transaction: pg_stat_activity is read afresh each time (not kept from the first).
    watch = await asyncpg.connect(store_location(backend, tmp_path))
    try:
        for writes in ([w("a")], [w("a", expected_version=0)]):
            deleting = conn.transaction()
            await deleting.start()
            await conn.execute(USER_LOCK, "bob")  # delete_user's transaction
            await conn.execute("DELETE FROM users WHERE name = 'bob'")
            put = asyncio.create_task(store.kv_put("~bob", writes, NOW))
            deadline = asyncio.get_running_loop().time() + 5
            waiting = (
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event = 'advisory' AND query LIKE 'SELECT pg_advisory_xact_lock_shared(%'"
            )
            while not await watch.fetchval(waiting):
                assert not put.done(), "the put did not wait for the deletion"
                assert asyncio.get_running_loop().time() < deadline, "the put never waited for the deletion"
                await asyncio.sleep(0.01)
            await deleting.rollback()
            assert (await put)[0] > 0  # the row stayed: the put goes ahead
            await store.kv_delete("~bob", "a", None, NOW)
        await _put_refused_once_a_deletion_commits(store, conn, watch, waiting, deadline + 5)
    finally:
        await conn.close()
        await watch.close()
    assert await store.kv_list("~bob", "", None, 10, NOW) == []


async def test_a_put_writes_nothing_to_the_user_row(backend: str, store: Store, tmp_path: Path) -> None:
    """PostgreSQL: the put's check used to key-share lock the users row (FOR KEY SHARE), writing its xmax --
    a MultiXact id under concurrent puts -- dirtying and WAL-logging the page on every put. The advisory
    lock leaves the row alone."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's row locks")
    await store.create_user(User("bob"))
    versions = await asyncio.gather(*(store.kv_put("~bob", [w(f"k{i}")], NOW) for i in range(20)))
    await store.kv_put("~bob", [w("k0", expected_version=versions[0][0])], NOW)  # (in whatever order they ran)
    await store.kv_delete("~bob", "k1", None, NOW)
    conn = await asyncpg.connect(store_location(backend, tmp_path))
    try:
        assert await conn.fetchval("SELECT xmax::text FROM users WHERE name = 'bob'") == "0"
    finally:
        await conn.close()


async def test_a_deletion_waits_for_a_write_holding_the_user_lock(backend: str, store: Store, tmp_path: Path) -> None:
    """PostgreSQL: ``delete_user`` takes the user's advisory lock exclusive before its DELETE, so it waits for
    a write that checked the row under the shared lock to commit (its keys then there for the second pass)."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's concurrent transactions")
    await store.create_user(User("bob"))
    conn = await asyncpg.connect(store_location(backend, tmp_path))
    watch = await asyncpg.connect(store_location(backend, tmp_path))
    try:
        writing = conn.transaction()
        await writing.start()
        await conn.execute(USER_LOCK_SHARED, "bob")  # a put's transaction, not yet committed
        deleting = asyncio.create_task(store.delete_user("bob"))
        deadline = asyncio.get_running_loop().time() + 5
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
        while not await watch.fetchval(waiting):
            assert not deleting.done(), "the deletion did not wait for the write"
            assert asyncio.get_running_loop().time() < deadline, "the deletion never waited for the write"
            await asyncio.sleep(0.01)
        assert await store.get_user("bob") is not None
        await writing.commit()
        assert await deleting
    finally:
        await conn.close()
        await watch.close()


async def test_the_owner_check_holds_where_the_database_defaults_to_repeatable_read(
    backend: str, tmp_path: Path
) -> None:
    """The check after the advisory lock must read what committed while the put waited: READ COMMITTED. A
    database (or role, or DSN) defaulting to REPEATABLE READ took the put's snapshot with its lock statement,
    before the wait, and the put to the deleted user's ~bob committed (review). The store sets its isolation."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's isolation levels")
    location = store_location(backend, tmp_path) + "&default_transaction_isolation=repeatable%20read"
    async with open_store(location) as store:
        store.userless_owners = False
        await store.create_user(User("alice"))
        await store.create_user(User("bob"))
        conn = await asyncpg.connect(location)
        watch = await asyncpg.connect(location)
        try:
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
            deadline = asyncio.get_running_loop().time() + 5
            await _put_refused_once_a_deletion_commits(store, conn, watch, waiting, deadline)
        finally:
            await conn.close()
            await watch.close()
        assert await store.kv_list("~bob", "", None, 10, NOW) == []


async def test_a_put_for_the_last_user_waits_for_its_deletion_and_is_refused(
    backend: str, store: Store, tmp_path: Path
) -> None:
    """PostgreSQL: a put to ~bob, bob the store's last user, waited for bob's deletion, then checked in a
    snapshot taken after the wait: no user rows at all, so "the store keeps no users" let it through, and
    its keys stayed for the name's next holder unless the deletion's second pass came after its commit.
    Whether the store keeps users is now read in the lock's own statement, before the wait."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's concurrent transactions")
    await store.create_user(User("bob"))  # the only user
    conn = await asyncpg.connect(store_location(backend, tmp_path))
    watch = await asyncpg.connect(store_location(backend, tmp_path))
    waiting = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event = 'advisory' AND query LIKE 'SELECT pg_advisory_xact_lock_shared(%'"
    )
    try:
        await _put_refused_once_a_deletion_commits(store, conn, watch, waiting, asyncio.get_running_loop().time() + 5)
    finally:
        await conn.close()
        await watch.close()
    assert await store.kv_list("~bob", "", None, 10, NOW) == []
    assert await store.kv_put("~tester", [w("a")], NOW) == [1]  # a store with no users: any ~NAME
