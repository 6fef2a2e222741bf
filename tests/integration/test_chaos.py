"""Chaos: three replicas on PostgreSQL under a read + compare-and-swap load; one is killed, one drained and restarted.

Issue 6's first two acceptance checks. Three ``bastion serve`` replicas share
one PostgreSQL schema. ``WORKERS`` worker coroutines (tests/support/chaos.py)
read their own keys and write them with compare-and-swap under idempotency
keys for ``duration`` seconds, while at one third of the run replica 1 is
killed with SIGKILL and at one half replica 2 is sent SIGTERM (it drains);
once it has exited a new process is started on its port and data directory.
Then:

* at least 99.9% of the logical calls succeeded;
* no acknowledged write was lost and none was applied twice (``verify``
  checks every key against the change log, and every read during the run
  checked it saw the worker's last acknowledged write);
* the attempts the clients made, retries included, came to at most 1.2
  times the calls offered (``CountingClient`` counts them);
* every replica but the killed one exited 0, and the restarted one serves
  calls again: through the balanced client once its breaker closes (backoff
  and health checks), through HAProxy on new connections once it is UP.

Two ways in: a balanced client given the three addresses
(``test_client_balancing_rides_through_kill_and_drain``), and HAProxy in TCP
mode in front of the replicas (the configuration of test_haproxy.py), each
worker with its own client, so its own connection through it
(``test_haproxy_rides_through_kill_and_drain``). CI runs 15 s; the 60 s runs
are marked ``slow``. Each prints its figures (``pytest -s``).

What fails. A keyed write in flight on the replica killed with SIGKILL has
claimed its idempotency key but not recorded its answer; whether it took
effect is unknown, so its retries elsewhere answer UNAVAILABLE ("still
running") until the claim's lease runs out, then ABORTED. Each worker then
reads its key back to learn the outcome (``verify`` checks it). Those few
calls -- about the number of workers whose write was on the killed replica --
are the expected failures; everything else must succeed.

Needs BASTION_TEST_POSTGRES_DSN (and ``haproxy`` for the second); skips
saying why otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bastion.client.aio import Client
from bastion.client.balancer import BreakerState
from tests.integration.test_haproxy import DIRECT_ADDRESS, haproxy_servers, run_haproxy
from tests.support.chaos import CountingClient, Fault, Replicas, Tally, run_load, verify
from tests.support.stores import store_location

DSN = os.environ.get("BASTION_TEST_POSTGRES_DSN")
#: Timing assertions: runs alone under ``pytest -n`` (the "exclusive" marker, tests/conftest.py).
pytestmark = [
    pytest.mark.skipif(not DSN, reason="set BASTION_TEST_POSTGRES_DSN to run the chaos tests"),
    pytest.mark.exclusive,
]

CI_DURATION = 15.0
FULL_DURATION = 60.0
WORKERS = 8
CALL_TIMEOUT = 10.0

MIN_SUCCESS = 0.999
MAX_ATTEMPTS_PER_CALL = 1.2


def replica_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # The per-principal rate limit (1000/s by default, per replica) is not what these tests are about: with
    # one replica killed and one restarting, the survivor took the whole load, and on a fast machine that
    # passed 1000/s (CI saw 113 of 19,424 calls refused RESOURCE_EXHAUSTED under the 99.9% floor).
    config = tmp_path / "chaos.toml"
    config.write_text("[rate_limits.per_principal]\nrate = 100000.0\nburst = 200000.0\n")
    return {
        "BASTION_CONFIG": str(config),
        "BASTION_STORE": store_location("postgresql", tmp_path, "chaos"),
        "BASTION_LIMITS__GRACE_PERIOD": "5",
        "BASTION_KV__HISTORY": "10000000",  # the whole run stays in the change log for ``verify``
        **extra,
    }


@contextlib.contextmanager
def running(group: Replicas) -> Iterator[Replicas]:
    """``group``, stopped afterwards: every process but a killed one must exit 0."""
    try:
        yield group
    finally:
        codes = group.stop()
    unclean = {pid: code for pid, code in codes.items() if code != 0 and pid not in group.killed}
    assert not unclean, f"replicas exited uncleanly: {unclean}"


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    with running(Replicas(tmp_path, replica_env(tmp_path), 3)) as group:
        yield group


@pytest.fixture
def proxied_replicas(tmp_path: Path) -> Iterator[Replicas]:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy; .ci/run does)")
    with running(Replicas(tmp_path, replica_env(tmp_path, BASTION_TRUSTED_PROXIES="127.0.0.1"), 3)) as group:
        yield group


def faults(group: Replicas, duration: float, drained: list[int]) -> list[tuple[float, str, Fault]]:
    async def kill() -> None:
        group.kill(1)

    async def drain() -> None:
        drained.append(await group.drain_and_restart(2))

    return [(duration / 3, "kill -9 r1", kill), (duration / 2, "SIGTERM r2 + restart", drain)]


async def calls_served(address: str, token: str, **options: object) -> int:
    """``calls_total`` of the server at ``address`` (this call included)."""
    async with Client(address, token=token, timeout=10, **options) as client:
        return int((await client.admin.stats())["calls_total"])


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


def check(tally: Tally, drained: list[int], label: str) -> None:
    assert drained == [0], f"the drained replica exited with {drained}"
    assert tally.success_rate >= MIN_SUCCESS, f"{tally.summary()}; errors: {tally.errors[:20]}"
    assert tally.retry_ratio <= MAX_ATTEMPTS_PER_CALL, tally.summary()


def run_balanced(group: Replicas, duration: float) -> None:
    token = group.token
    drained: list[int] = []

    async def main() -> Tally:
        client = CountingClient(group.addresses, token=token, timeout=CALL_TIMEOUT, health_interval=0.5)
        async with client:
            tally = await run_load(
                [client],
                workers=WORKERS,
                duration=duration,
                faults=faults(group, duration, drained),
                run=uuid.uuid4().hex,
            )
            await verify(client, tally)
            # The restarted replica takes calls again once its breaker closes (backoff and health checks).
            restarted = group.processes[2]
            tally.events.append(f"restarted replica served {await calls_served(restarted.address, token) - 1} calls")
            print(f"\n[client balancing, {duration:.0f}s] {tally.summary()}; errors: {tally.errors}")
            (endpoint,) = [e for e in client.endpoints if e.port == restarted.port]
            await wait_until(lambda: endpoint.breaker.state is BreakerState.CLOSED, 40, "r2's breaker to close")
            for _ in range(20):
                await client.call("kv.get", key="cas-0")
            assert await calls_served(restarted.address, token) > 2, "the restarted replica served nothing"
        return tally

    tally = asyncio.run(main())
    check(tally, drained, f"client balancing, {duration:.0f}s")


def run_proxied(tmp_path: Path, group: Replicas, duration: float) -> None:
    token = group.token
    drained: list[int] = []
    with run_haproxy(tmp_path, group.processes) as (address, stats):

        async def main() -> Tally:
            clients = [CountingClient(address, token=token, timeout=CALL_TIMEOUT) for _ in range(WORKERS)]
            try:
                tally = await run_load(
                    clients,
                    workers=WORKERS,
                    duration=duration,
                    faults=faults(group, duration, drained),
                    run=uuid.uuid4().hex,
                )
                await verify(clients[0], tally)
            finally:
                for client in clients:
                    await client.close()
            # The workers' connections stay where they are; new ones reach the restarted replica once it is UP.
            restarted = group.processes[2]
            served = await calls_served(restarted.address, token, source_address=DIRECT_ADDRESS) - 1
            tally.events.append(f"restarted replica served {served} calls")
            print(f"\n[HAProxy, {duration:.0f}s] {tally.summary()}; errors: {tally.errors}")
            await wait_until(lambda: haproxy_servers(stats)["r2"] == "UP", 10, "HAProxy to see r2 UP")
            for _ in range(4):  # leastconn over r0 and r2, both idle now
                async with Client(address, token=token, timeout=CALL_TIMEOUT) as client:
                    await client.call("kv.get", key="cas-0")
            assert await calls_served(restarted.address, token, source_address=DIRECT_ADDRESS) > served + 2
            return tally

        tally = asyncio.run(main())
    check(tally, drained, f"HAProxy, {duration:.0f}s")


def test_client_balancing_rides_through_kill_and_drain(replicas: Replicas) -> None:
    run_balanced(replicas, CI_DURATION)


def test_haproxy_rides_through_kill_and_drain(tmp_path: Path, proxied_replicas: Replicas) -> None:
    run_proxied(tmp_path, proxied_replicas, CI_DURATION)


@pytest.mark.slow
def test_client_balancing_rides_through_kill_and_drain_full(replicas: Replicas) -> None:
    run_balanced(replicas, FULL_DURATION)


@pytest.mark.slow
def test_haproxy_rides_through_kill_and_drain_full(tmp_path: Path, proxied_replicas: Replicas) -> None:
    run_proxied(tmp_path, proxied_replicas, FULL_DURATION)
