"""The kv watch hub (bastion/services/kv_watch.py) over a real store (both backends), driven step by step."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bastion.services.kv_watch import Hub, Watcher
from bastion.store import open_store
from bastion.store.kv import KVWrite
from tests.support.stores import service_store

pytestmark = pytest.mark.usefixtures("service_backend")


def test_a_watcher_leaving_while_the_feed_reads_leaves_no_stale_position_for_the_next(tmp_path: Path) -> None:
    async def main() -> None:
        async with open_store(service_store(tmp_path)) as store:
            hub = Hub(store)
            first = Watcher("~ada", "", 16, 1 << 20, "ada")
            await hub.join(first)
            await store.kv_put("~ada", [KVWrite("k", b"1")], time.time())
            feed = asyncio.create_task(hub._feed_once())
            await asyncio.sleep(0)  # one turn: the feed holds the lock and waits for the store's read
            hub.leave(first)  # nobody watches now (leaving takes no lock)
            await feed
            for i in range(5):  # then the log moves on, and is compacted, while nobody watches
                await store.kv_put("~ada", [KVWrite("k", str(i).encode())], time.time())
            await store.kv_compact(keep=1)
            current = (await store.kv_revisions()).current
            second = Watcher("~ada", "", 16, 1 << 20, "ada")
            # It used to join at the revision the feed read before the first left: a fresh watch
            # then began with old changes, or (here, compacted) was ended at once as "fell behind".
            assert await hub.join(second) == current
            await hub._feed_once()
            assert second.ended is None and not second.overflowed and second.take() is None

    asyncio.run(asyncio.wait_for(main(), 10))
