"""kv.watch across replicas: a watch on replica A sees a put made through replica B within a second."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bastion.client.aio import Client
from tests.support.stores import store_location


def test_a_watch_on_one_replica_sees_a_put_through_another_within_a_second(server_factory: Any, tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "shared")
    a = server_factory(env={"BASTION_STORE": location}, name="a")
    b = server_factory(env={"BASTION_STORE": location}, name="b")
    token = (a if a.token_file.exists() else b).token

    async def main() -> list[float]:
        async with Client(a.address, token=token, timeout=10) as on_a, Client(b.address, token=token) as on_b:
            stream = on_a.stream("kv.watch", prefix="room/")
            events = stream.__aiter__()
            start = await anext(events)  # the watch has joined: changes from here on are live
            assert start["type"] == "start"
            delays = []
            for i in range(5):
                sent = time.monotonic()
                version = await on_b.kv.put(key=f"room/{i}", value=b"hello")
                async with asyncio.timeout(1.0):
                    change = await anext(events)
                delays.append(time.monotonic() - sent)
                assert (change["type"], change["key"], change["version"]) == ("put", f"room/{i}", version)
            await stream.aclose()
            return delays

    delays = asyncio.run(main())
    assert max(delays) < 1.0, delays
