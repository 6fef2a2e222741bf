"""Store.listen: replicas sharing PostgreSQL hear of each other's kv writes at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bastion.store import open_store
from bastion.store.kv import KVWrite, personal_namespace
from tests.support.stores import store_location

#: Timing assertions, or effects on the whole PostgreSQL server: runs alone under
#: ``pytest -n`` (the "exclusive" marker, tests/conftest.py).
pytestmark = pytest.mark.exclusive

NS = personal_namespace("ada")


async def test_sqlite_has_no_notifications(tmp_path: Path) -> None:
    async with open_store(store_location("sqlite", tmp_path)) as store:
        assert await store.listen("kv", lambda: None) is None


async def test_a_kv_write_on_one_replica_notifies_the_others(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "shared")
    elsewhere = store_location("postgresql", tmp_path, "elsewhere")  # another deployment, same database
    async with open_store(location) as a, open_store(location) as b, open_store(elsewhere) as other:
        heard = asyncio.Event()
        stray = asyncio.Event()
        stop = await a.listen("kv", heard.set)
        stop_other = await other.listen("kv", stray.set)
        assert stop is not None and stop_other is not None
        async with asyncio.timeout(5):  # the callback also runs once listening starts (catch-up)
            await heard.wait()
            await stray.wait()
        heard.clear()
        stray.clear()
        await b.kv_put(NS, [KVWrite("k", b"v")], 1.0)
        async with asyncio.timeout(1):
            await heard.wait()
        await asyncio.sleep(0.2)  # a notification for another schema would have arrived by now
        assert not stray.is_set()
        await stop()
        await stop_other()


async def test_listening_survives_a_killed_connection(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "shared")
    async with open_store(location) as a, open_store(location) as b:
        heard = asyncio.Event()
        stop = await a.listen("kv", heard.set)
        assert stop is not None
        async with asyncio.timeout(5):
            await heard.wait()
        heard.clear()

        async def kill(conn: object) -> int:
            return int(
                await conn.fetchval(  # type: ignore[attr-defined]
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid() AND datname = current_database()"
                )
            )

        assert await b._call(kill) >= 1
        async with asyncio.timeout(5):  # reconnected: the catch-up call
            await heard.wait()
        heard.clear()
        await b.kv_put(NS, [KVWrite("k", b"v")], 1.0)
        async with asyncio.timeout(2):
            await heard.wait()
        await stop()
