"""Client-side balancing over real replicas on one PostgreSQL schema: kill -9, drain, idempotency keys."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.client.aio import Client
from bastion.client.balancer import BreakerState
from tests.support.server import ServerProcess, start_server
from tests.support.stores import store_location

DSN = os.environ.get("BASTION_TEST_POSTGRES_DSN")
pytestmark = pytest.mark.skipif(not DSN, reason="set BASTION_TEST_POSTGRES_DSN to run the replica tests")


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Three ``bastion serve`` on one PostgreSQL schema (started one at a time: the first bootstraps admin)."""
    assert DSN is not None
    url = store_location("postgresql", tmp_path, "replicas")
    env = {"BASTION_STORE": url, "BASTION_LIMITS__GRACE_PERIOD": "5"}
    started: list[ServerProcess] = []
    try:
        for i in range(3):
            started.append(start_server(tmp_path / f"r{i}", env=env))
        yield started
    finally:
        for proc in started:
            proc.stop()  # a killed one is already gone; its exit code is the test's business


def test_idempotent_calls_survive_kill_and_drain(replicas: list[ServerProcess]) -> None:
    servers = replicas
    token = servers[0].token

    async def main() -> None:
        addresses = [s.address for s in servers]
        async with Client(addresses, token=token, timeout=10, health_interval=0.2) as cl:
            await cl.call("kv.put", key="k", value=b"v0")
            for _ in range(30):
                assert (await cl.call("kv.get", key="k"))["value"] == b"v0"
            assert {e.port for e in cl.endpoints} == {s.port for s in servers}
            assert all(e.breaker.state is BreakerState.CLOSED for e in cl.endpoints)

            async def load(n: int) -> int:
                ok = 0
                for _ in range(n):
                    await cl.call("kv.get", key="k")
                    ok += 1
                return ok

            # kill -9 one replica while 8 readers run: every read still succeeds.
            readers = [asyncio.ensure_future(load(40)) for _ in range(8)]
            await asyncio.sleep(0.05)
            servers[0].signal(signal.SIGKILL)
            assert sum(await asyncio.gather(*readers)) == 320
            # SIGTERM (drain) another: new calls, reads and writes, see no error.
            readers = [asyncio.ensure_future(load(40)) for _ in range(8)]
            await asyncio.sleep(0.05)
            servers[1].signal(signal.SIGTERM)
            assert sum(await asyncio.gather(*readers)) == 320
            for i in range(20):
                await cl.invoke("kv.put", {"key": f"w{i}", "value": b"x"}, idempotency_key=True)
        assert servers[1].process.wait(10) == 0  # the drained replica exited cleanly

    asyncio.run(main())


def test_a_keyed_put_retried_after_a_lost_connection_is_applied_once(replicas: list[ServerProcess]) -> None:
    servers = replicas[:2]
    token = servers[0].token

    async def main() -> None:
        async with Client(servers[1].address, token=token, timeout=10) as b:
            first = await b.call("kv.put", key="acct", value=b"0")
            # The first attempt reaches replica A and runs there; the client then drops that connection.
            a = Client(servers[0].address, token=token, timeout=10)
            args = {"key": "acct", "value": b"1", "expected_version": first}
            attempt = asyncio.ensure_future(a.invoke("kv.put", args, idempotency_key="order-1"))
            got = None
            for _ in range(200):
                got = await b.call("kv.get", key="acct")
                if got["version"] > first:
                    break
                await asyncio.sleep(0.01)
            assert got is not None and got["version"] == first + 1
            # The connection is lost as soon as the put has committed, its answer perhaps not yet recorded
            # nor sent (no Cancel: a network's loss). The call runs on to its end on A and records its
            # answer, so the client's own retry gets it, not "outcome unknown" (docs/operations.md).
            conn = a._conn
            assert conn is not None and conn.link is not None
            conn.link.abort()
            assert await asyncio.wait_for(attempt, 10) == first + 1
            await a.close()
            # The retry goes to the other replica: the first answer comes back, nothing runs twice.
            async with Client([s.address for s in servers], token=token, timeout=10) as both:
                for _ in range(4):
                    again = await both.invoke("kv.put", args, idempotency_key="order-1")
                    assert again == first + 1
            after = await b.call("kv.get", key="acct")
            assert after["version"] == first + 1 and after["value"] == b"1"
            # The same key for a different call is refused.
            with pytest.raises(Exception, match="already used"):
                await b.invoke("kv.put", {"key": "acct", "value": b"2"}, idempotency_key="order-1")

    asyncio.run(main())
