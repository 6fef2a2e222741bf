"""The login throttle across replicas: two ``bastion serve`` on one PostgreSQL store, sharing Redis.

Only the lockouts and the known sources used to be shared by replicas: the
failure counts of a (username, source) pair were each server's own, so
guesses spread over K replicas got ``max_failures_per_user_source - 1``
failures on each before one of them wrote the lockout. With
``rate_limits.redis_url`` set the failure counts, the allowances and the
attempts in flight live in Redis, so the replicas share one budget. Real
server processes over TCP+TLS, real PostgreSQL and Redis (skipped, saying
why, without BASTION_TEST_POSTGRES_DSN or BASTION_TEST_REDIS_URL); each test
uses a Redis key prefix of its own and deletes its keys afterwards. The
last test, of a Redis that does not answer, needs neither (one server, SQLite).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import argon2
import pytest

import bastion
from bastion import SyncClient
from bastion.store import open_store
from tests.integration.test_login_workers import RIGHT, _guess_at_once
from tests.support.server import ServerProcess
from tests.support.stores import store_location

redis = pytest.importorskip("redis", reason="the redis package is not installed (pip install 'bastion[redis]')")

URL = os.environ.get("BASTION_TEST_REDIS_URL", "")
needs_redis = pytest.mark.skipif(
    not URL, reason="BASTION_TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0, as CI sets it)"
)
MAX_FAILURES = 4
DEAD_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix for this test alone; its keys are deleted afterwards."""
    prefix = f"bastion:test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _replicas(server_factory: Any, tmp_path: Path, prefix: str) -> tuple[ServerProcess, ServerProcess, str]:
    """Replicas a and b on one PostgreSQL store and one Redis; and the store's location."""
    location = store_location("postgresql", tmp_path, "shared")
    env = {
        "BASTION_STORE": location,
        "BASTION_RATE_LIMITS__REDIS_URL": URL,
        "BASTION_RATE_LIMITS__REDIS_PREFIX": prefix,
        "BASTION_RATE_LIMITS__REDIS_TIMEOUT": "5",  # a loaded CI machine must not count Redis as down
        "BASTION_AUTH__MAX_FAILURES_PER_USER_SOURCE": str(MAX_FAILURES),
        "BASTION_AUTH__LOCKOUT": "60",
    }
    a = server_factory(env=env, name="a")
    b = server_factory(env=env, name="b")
    admin = a if a.token_file.exists() else b
    with SyncClient(admin.address, token_file=str(admin.token_file), timeout=10) as root:
        root.auth.create_user(name="victim", password=RIGHT)
    return a, b, location


@needs_redis
def test_guesses_alternating_over_two_replicas_lock_the_pair_after_max_failures_in_all(
    server_factory: Any, tmp_path: Path, prefix: str
) -> None:
    a, b, _ = _replicas(server_factory, tmp_path, prefix)
    with SyncClient(a.address, timeout=10) as on_a, SyncClient(b.address, timeout=10) as on_b:
        replicas = [on_a, on_b]
        for i in range(MAX_FAILURES):  # a, b, a, b: each replica sees only half of them
            with pytest.raises(bastion.Unauthenticated):
                replicas[i % 2].auth.login(username="victim", password=f"wrong guess {i}")
        for client in replicas:  # locked after MAX_FAILURES in all, on both, even with the right password
            with pytest.raises(bastion.ResourceExhausted, match="too many failed attempts") as info:
                client.auth.login(username="victim", password=RIGHT)
            assert 50 < (info.value.retry_after or 0) <= 60


@needs_redis
def test_a_success_on_one_replica_forgives_the_failures_counted_on_the_other(
    server_factory: Any, tmp_path: Path, prefix: str
) -> None:
    a, b, _ = _replicas(server_factory, tmp_path, prefix)
    with SyncClient(a.address, timeout=10) as on_a, SyncClient(b.address, timeout=10) as on_b:
        for i in range(MAX_FAILURES - 1):
            with pytest.raises(bastion.Unauthenticated):
                on_a.auth.login(username="victim", password=f"wrong guess {i}")
        on_b.auth.login(username="victim", password=RIGHT)  # the user, from the same address: forgiven
        for i in range(MAX_FAILURES - 1):  # a fresh round: no lockout yet
            with pytest.raises(bastion.Unauthenticated):
                on_a.auth.login(username="victim", password=f"wrong guess {i}")


@needs_redis
def test_guesses_sent_at_once_to_both_replicas_get_one_round_not_one_per_replica(
    server_factory: Any, tmp_path: Path, prefix: str
) -> None:
    a, b, location = _replicas(server_factory, tmp_path, prefix)
    slow = argon2.PasswordHasher(time_cost=100, memory_cost=8192, parallelism=1).hash(RIGHT)

    async def write() -> None:  # about a second to verify: the guesses are certainly all in flight at once
        async with open_store(location) as store:
            assert await store.set_password_hash("victim", slow)

    asyncio.run(write())
    clients = [SyncClient(server.address, timeout=30) for server in (a, b) for _ in range(MAX_FAILURES)]
    try:
        results = _guess_at_once(clients, "a wrong guess")
    finally:
        for client in clients:
            client.close()
    verified = [r for r in results if isinstance(r, bastion.Unauthenticated)]
    refused = [r for r in results if isinstance(r, bastion.ResourceExhausted)]
    assert len(verified) + len(refused) == len(results), results
    assert len(verified) <= MAX_FAILURES, f"{len(verified)} guesses verified on 2 replicas: {results}"
    assert all("at once" in str(r) and 0 < (r.retry_after or 0) <= 1 for r in refused), refused


@pytest.mark.parametrize("fail_open", [True, False])
def test_with_redis_down_logins_are_throttled_per_server_or_refused_as_configured(
    server_factory: Any, fail_open: bool
) -> None:
    server = server_factory(
        env={
            "BASTION_RATE_LIMITS__REDIS_URL": DEAD_URL,
            "BASTION_AUTH__REDIS_FAIL_OPEN": str(fail_open).lower(),
            "BASTION_AUTH__MAX_FAILURES_PER_USER_SOURCE": "2",
        }
    )
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        root.auth.create_user(name="victim", password=RIGHT)
        with SyncClient(server.address, timeout=10) as guesser:
            if fail_open:  # this server's own limits: the lockout after 2
                for _ in range(2):
                    with pytest.raises(bastion.Unauthenticated):
                        guesser.auth.login(username="victim", password="a wrong guess")
                with pytest.raises(bastion.ResourceExhausted, match="too many failed attempts"):
                    guesser.auth.login(username="victim", password=RIGHT)
            else:  # no password is verified; the token still works
                with pytest.raises(bastion.Unavailable, match="login throttle") as info:
                    guesser.auth.login(username="victim", password=RIGHT)
                assert info.value.retry_after == 1.0
        assert root.auth.whoami()["name"]
