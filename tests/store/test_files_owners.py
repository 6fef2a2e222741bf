"""An upload begins only while its owner and its uploader have user rows (if the store keeps users): the
service checked them before ``files_begin_upload``, and an upload that began after the whole of
``auth.delete_user`` (both passes, which drop the user's uploads) stayed, and its commit made a file of a
user that no longer existed -- found by whoever was given the name next. The begin's own transaction checks
now (a commit needs its upload row: one begun before the passes is dropped by them)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from bastion.exceptions import NotFound
from bastion.security.credentials import User
from bastion.store import Store
from bastion.store._access import USER_LOCK
from tests.store.test_files import upload
from tests.support.stores import store_location


@pytest.fixture(autouse=True)
def _checked(store: Store) -> None:
    """``bastion serve``'s setting: an upload is checked (the library default takes principals with no row)."""
    store.userless_owners = False


async def _delete_user(store: Store, name: str) -> None:
    """What ``auth.delete_user`` does to the row and the files: a pass, the row, a pass again."""
    await store.files_reassign_owner(name, None)
    assert await store.delete_user(name)
    await store.files_reassign_owner(name, None)


async def test_an_upload_checked_before_its_user_was_deleted_does_not_begin_after(store: Store) -> None:
    for name in ("alice", "bob"):
        await store.create_user(User(name))
    assert await store.get_user("bob") is not None  # the service's checks pass...
    await _delete_user(store, "bob")  # ...the whole deletion runs, then the upload begins
    with pytest.raises(NotFound, match="no user 'bob'"):
        await store.files_begin_upload(upload("u1", owner="bob"), quota=10**12)
    with pytest.raises(NotFound, match="no user 'bob'"):  # a write share's holder, uploading alice's file
        await store.files_begin_upload(upload("u2", owner="alice", uploader="bob"), quota=10**12)
    assert await store.files_list_uploads(None) == []
    await store.files_begin_upload(upload("u3", owner="alice"), quota=10**12)  # a user's own goes on
    assert [u.id for u in await store.files_list_uploads(None)] == ["u3"]


async def test_a_store_without_users_or_serving_principals_without_users_takes_any_upload(store: Store) -> None:
    """No user rows (another authenticator's principals), or tls.client_subjects = "any" (a certificate
    naming no user owns its files)."""
    await store.files_begin_upload(upload("u1", owner="tester"), quota=10**12)
    await store.create_user(User("alice"))
    with pytest.raises(NotFound, match="no user 'sensor-7'"):
        await store.files_begin_upload(upload("u2", owner="sensor-7"), quota=10**12)
    store.userless_owners = True
    await store.files_begin_upload(upload("u2", owner="sensor-7"), quota=10**12)
    assert [u.id for u in await store.files_list_uploads(None)] == ["u1", "u2"]


async def test_an_upload_waits_for_a_user_deletion_in_progress(backend: str, store: Store, tmp_path: Path) -> None:
    """PostgreSQL: the begin takes the users' advisory locks shared in its transaction, so it waits for a
    deletion not yet committed (which took bob's exclusive, as ``delete_user`` does) and is then refused (and
    a deletion waits for a begin holding it); the begins write nothing to the users rows."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's concurrent transactions")
    for name in ("alice", "bob"):
        await store.create_user(User(name))
    conn = await asyncpg.connect(store_location(backend, tmp_path))
    # Polled outside conn's transaction: pg_stat_activity is read afresh each time (not kept from the first).
    watch = await asyncpg.connect(store_location(backend, tmp_path))
    waiting = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event = 'advisory' AND query LIKE 'SELECT pg_advisory_xact_lock_shared(%'"
    )
    try:
        for i in range(3):  # an upload of alice's (owner and uploader): her row is left alone
            await store.files_begin_upload(upload(f"a{i}", owner="alice"), quota=10**12)
        assert await conn.fetchval("SELECT xmax::text FROM users WHERE name = 'alice'") == "0"
        deleting = conn.transaction()
        await deleting.start()
        await conn.execute(USER_LOCK, "bob")  # delete_user's transaction
        await conn.execute("DELETE FROM users WHERE name = 'bob'")
        begin = asyncio.create_task(store.files_begin_upload(upload("u1", owner="bob"), quota=10**12))
        deadline = asyncio.get_running_loop().time() + 5
        while not await watch.fetchval(waiting):
            assert not begin.done(), "the upload did not wait for the deletion"
            assert asyncio.get_running_loop().time() < deadline, "the upload never waited for the deletion"
            await asyncio.sleep(0.01)
        await deleting.commit()
        with pytest.raises(NotFound, match="no user 'bob'"):
            await begin
    finally:
        await conn.close()
        await watch.close()
    assert [u.id for u in await store.files_list_uploads(None)] == ["a0", "a1", "a2"]


async def test_an_upload_of_the_last_user_waits_for_its_deletion_and_is_refused(
    backend: str, store: Store, tmp_path: Path
) -> None:
    """PostgreSQL: an upload of bob, the store's last user, waited for bob's deletion, then checked in a
    snapshot taken after it: no user rows at all, so "the store keeps no users" let it begin, and only the
    deletion's second pass (if it came after the commit) dropped it. Whether the store keeps users is now
    read before the wait (the lock's own statement)."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's concurrent transactions")
    await store.create_user(User("bob"))
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
        begin = asyncio.create_task(store.files_begin_upload(upload("u1", owner="bob"), quota=10**12))
        deadline = asyncio.get_running_loop().time() + 5
        while not await watch.fetchval(waiting):
            assert not begin.done(), "the upload did not wait for the deletion"
            assert asyncio.get_running_loop().time() < deadline, "the upload never waited for the deletion"
            await asyncio.sleep(0.01)
        await deleting.commit()
        with pytest.raises(NotFound, match="no user 'bob'"):
            await begin
    finally:
        await conn.close()
        await watch.close()
    assert await store.files_list_uploads(None) == []
    await store.files_begin_upload(upload("u2", owner="tester"), quota=10**12)  # a store with no users
    assert [u.id for u in await store.files_list_uploads(None)] == ["u2"]
