"""A restore never sets durable topics' offsets back (bastion/store/restore_topics.py), on SQLite and PostgreSQL.

Offsets handed out after the backup was taken must not be handed out again
to other messages: a subscriber resuming ``from_offset`` N from before the
restore would silently get different messages under the same offsets. A
topic the replaced store had moved on from keeps the archive's messages and
goes on with the ones the replaced store still holds after them (the log
stays one unbroken range); only if the replaced store no longer holds all
of those does it start, restored, empty after the last offset it handed
out, so a resume from before the restore finds its offset no longer kept
(OUT_OF_RANGE) rather than wrong data.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from bastion.store import Store, backup, open_store
from bastion.store.sqlite import SQLiteStore
from bastion.store.topics import TopicHead, TopicPosition
from tests.store.test_backup import FAST, pg_cleanup, schema_of
from tests.support.stores import store_location

__all__ = ["pg_cleanup"]  # the fixture, imported to be used here

NOW = 1000.0
T = TypeVar("T")


async def publish(store: Store, topic: str, payload: bytes) -> int:
    _, offset = await store.topics_append(topic, True, "ada", payload, {}, NOW)
    assert offset is not None
    return offset


async def before_the_backup(store: Store) -> None:
    assert [await publish(store, "grew", b"old %d" % i) for i in (1, 2)] == [1, 2]
    assert await publish(store, "same", b"kept") == 1
    assert await publish(store, "forgotten", b"old") == 1
    assert [await publish(store, "cut", b"old %d" % i) for i in (1, 2)] == [1, 2]


async def after_the_backup(store: Store) -> TopicPosition:
    """Offsets the backup does not hold: more of "grew", more of "cut" (trimmed since, past the archive's),
    a new topic, and one emptied and forgotten since."""
    assert [await publish(store, "grew", b"after %d" % i) for i in (3, 4)] == [3, 4]
    assert [await publish(store, "cut", b"after %d" % i) for i in (3, 4)] == [3, 4]
    assert await store.topics_trim("cut", 3, None, 100) == 3
    assert [await publish(store, "new", b"new %d" % i) for i in (1, 2, 3)] == [1, 2, 3]
    assert [await publish(store, "forgotten", b"after %d" % i) for i in (2, 3)] == [2, 3]
    await store.topics_trim("forgotten", 3, None, 100)
    assert await store.topics_forget(["forgotten"]) == 1
    return await store.topics_position()


async def check_offsets_go_on(store: Store, replaced: TopicPosition) -> None:
    # The offsets used to be the archive's again: "grew" handed out 3 and 4 anew, "new" 1 to 3, and a
    # subscriber resuming from one of them got other messages under the offsets it had seen.
    position = await store.topics_position()
    assert position.seq >= replaced.seq and position.trimmed >= replaced.trimmed
    # "grew" moved on after the backup: it used to be restored empty (every archived message of it dropped);
    # now the archive's messages are kept and the replaced store's after them follow, under their offsets.
    assert await store.topics_head("grew") == TopicHead("grew", 1, 4)
    grew = await store.topics_replay("grew", 1, position.seq, 100)
    assert [(m.offset, m.payload) for m in grew] == [(1, b"old 1"), (2, b"old 2"), (3, b"after 3"), (4, b"after 4")]
    assert await publish(store, "grew", b"restored 5") == 5
    # "cut" moved on too, but the replaced store no longer holds offset 3: its archived messages are gone with
    # the offsets after them, so a resume from before the restore is told its offset is no longer kept.
    assert await store.topics_head("cut") == TopicHead("cut", 5, 4)
    assert await store.topics_replay("cut", 1, position.seq, 100) == []
    assert await publish(store, "cut", b"restored 5") == 5
    # A topic the backup did not have, and one forgotten since: above every offset they had.
    assert await store.topics_head("new") == TopicHead("new", 4, 3)
    assert await publish(store, "new", b"restored 4") == 4
    assert await store.topics_head("forgotten") == TopicHead("forgotten", 4, 3)
    assert await publish(store, "forgotten", b"restored 4") == 4
    # Untouched since the backup: its messages are the archive's, as they were.
    (kept,) = await store.topics_replay("same", 1, position.seq, 100)
    assert (kept.offset, kept.payload) == (1, b"kept")
    assert await publish(store, "same", b"restored 2") == 2
    later = await store.topics_position()
    assert later.seq > replaced.seq  # new messages come after every one the replaced store had


def test_restoring_an_older_sqlite_backup_keeps_topic_offsets_going_forward(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db, files, out = data / "bastion.db", data / "files", tmp_path / "a.bbk"

    async def run(path: Path, step: Callable[[Store], Awaitable[T]]) -> T:
        async with SQLiteStore(path) as store:
            return await step(store)

    asyncio.run(run(db, before_the_backup))
    backup.backup_sqlite(db, files, out, None, scrypt_log_n=FAST)
    replaced = asyncio.run(run(db, after_the_backup))
    backup.restore_sqlite(out, db, files, None)
    asyncio.run(run(db, lambda store: check_offsets_go_on(store, replaced)))

    # Into a fresh data directory there is nothing to carry over: the archive's offsets (docs/operations.md).
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    backup.restore_sqlite(out, fresh / "bastion.db", fresh / "files", None)

    async def archived(store: Store) -> None:
        assert await store.topics_head("grew") == TopicHead("grew", 1, 2)
        assert await store.topics_head("new") is None

    asyncio.run(run(fresh / "bastion.db", archived))


async def test_restoring_an_older_postgres_backup_keeps_topic_offsets_going_forward(
    tmp_path: Path, pg_cleanup: list[str]
) -> None:
    dsn = store_location("postgresql", tmp_path, "live")
    pg_cleanup.append(schema_of(dsn) + "_")
    out = tmp_path / "a.bbk"
    async with open_store(dsn) as store:
        await before_the_backup(store)
        await backup.backup_postgres(store, tmp_path / "files", out, None, scrypt_log_n=FAST)
        replaced = await after_the_backup(store)
    await backup.restore_postgres(out, dsn, tmp_path / "files-restored", None, force=True)
    async with open_store(dsn) as store:
        await check_offsets_go_on(store, replaced)


def test_a_replaced_store_whose_topic_log_cannot_be_read_still_restores(tmp_path: Path) -> None:
    """Restoring over a damaged store is what restores are for: when the messages after the archive's cannot
    be read from it, the topic starts empty after its last offset, as before they were copied over."""
    data = tmp_path / "data"
    data.mkdir()
    db, files, out = data / "bastion.db", data / "files", tmp_path / "a.bbk"

    async def run(step: Callable[[Store], Awaitable[T]]) -> T:
        async with SQLiteStore(db) as store:
            return await step(store)

    asyncio.run(run(before_the_backup))
    backup.backup_sqlite(db, files, out, None, scrypt_log_n=FAST)
    asyncio.run(run(after_the_backup))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'topic_log'").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as f:  # the log's pages unreadable; the heads and counters still read
        f.seek((root - 1) * size)
        f.write(b"\xff" * size)
    backup.restore_sqlite(out, db, files, None)

    async def check(store: Store) -> None:
        assert await store.topics_head("grew") == TopicHead("grew", 5, 4)
        assert await publish(store, "grew", b"restored 5") == 5

    asyncio.run(run(check))
