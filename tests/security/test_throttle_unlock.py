"""``LoginThrottle.unlock`` (an admin's ``auth.unlock_user``): every lockout of the user lifted, from every
source, and their failures and allowance forgotten -- in the store, in memory, in the workers' shared table
and in Redis (two throttles on one prefix stand for two replicas; needs BASTION_TEST_REDIS_URL) -- and
nobody else's. A Redis that fails leaves the rest done and says UNAVAILABLE."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bastion.exceptions import Unavailable
from bastion.security.ratelimit_shared import SharedTable
from bastion.security.throttle import LoginThrottle
from bastion.store import open_store
from tests.security.test_throttle_redis import DEAD_URL, Clock, needs_redis, refused, replicas

LOCKED = "too many failed attempts; try again later"


async def _lock(throttle: LoginThrottle, user: str, source: str, failures: int) -> None:
    assert [await throttle.failed(user, source) for _ in range(failures)][-1] is True


def test_an_unlock_lifts_every_lockout_of_the_user_and_forgets_their_counts_in_memory(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=3, global_per_hour=10, clock=clock)
            for source in ("10.0.0.1", "2001:db8::1"):
                await _lock(throttle, "ada", source, 3)
            for user in ("adab", "ada_b"):  # names that share a prefix with hers: left alone
                await _lock(throttle, user, "10.0.0.1", 3)
            for _ in range(2):  # one short of a lockout
                await throttle.failed("ada", "10.0.0.9")
            await throttle.succeeded("ada", "10.0.0.7")  # a known source: stays known
            assert await refused(throttle, "ada", "10.0.0.1") == LOCKED
            assert await throttle.unlock("ada") == 2
            for source in ("10.0.0.1", "2001:db8::1", "10.0.0.9"):
                assert await refused(throttle, "ada", source) is None
            # The whole allowance again: two failures from 10.0.0.9 lock nothing; a third locks.
            assert [await throttle.failed("ada", "10.0.0.9") for _ in range(3)] == [False, False, True]
            for user in ("adab", "ada_b"):
                assert await refused(throttle, user, "10.0.0.1") == LOCKED
            assert await store.get_lockout("known:ada|10.0.0.7") is not None
            clock.now += 1000  # an ended lockout is lifted (deleted) but not counted as one
            assert await throttle.unlock("ada") == 0
            assert await throttle.unlock("nobody") == 0

    asyncio.run(main())


def test_an_unlock_on_one_worker_refills_the_users_allowance_on_the_other(tmp_path: Path) -> None:
    """With ``--workers`` the per-user allowance is a bucket in their shared table: refilled for all."""

    async def main() -> None:
        shared = SharedTable.create(1000)
        async with open_store(tmp_path / "s.db") as store:
            one, two = (LoginThrottle(store, max_failures=5, global_per_hour=2, shared=shared) for _ in range(2))
            await one.failed("bob", "10.0.1.1")
            await two.failed("bob", "10.0.1.2")
            assert "for this user" in (await refused(one, "bob", "10.0.2.1") or "")
            assert await two.unlock("bob") == 0
            assert await refused(one, "bob", "10.0.2.1") is None

    asyncio.run(main())


@needs_redis
def test_an_unlock_on_one_replica_lifts_the_lockouts_in_redis_for_both(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, a: LoginThrottle, b: LoginThrottle) -> None:
        for source in ("10.0.0.1", "10.0.0.2"):
            await _lock(a, "ada", source, 3)
        await _lock(a, "adab", "10.0.0.1", 3)
        await b.failed("ada", "10.0.0.3")
        await b.failed("ada_b", "10.0.0.3")
        assert await refused(b, "ada", "10.0.0.1") == LOCKED
        assert await b.unlock("ada") == 2
        for throttle in (a, b):
            for source in ("10.0.0.1", "10.0.0.2"):
                assert await refused(throttle, "ada", source) is None
        left = sorted([key.decode()[len(prefix) :] async for key in client.scan_iter(match=prefix + "{login}:[flu]:*")])
        assert left == ["{login}:f:ada_b|10.0.0.3", "{login}:l:adab|10.0.0.1", "{login}:u:ada_b", "{login}:u:adab"]
        assert [await a.failed("ada", "10.0.0.3") for _ in range(3)] == [False, False, True]  # forgotten

    replicas(tmp_path, body, max_failures=3, lockout=60)


def test_with_redis_down_an_unlock_lifts_the_store_lockouts_and_says_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=2, redis_url=DEAD_URL)
            try:
                await _lock(throttle, "ada", "10.0.0.1", 2)
                with pytest.raises(Unavailable, match="Redis failed: try again") as info:
                    await throttle.unlock("ada")
                assert info.value.retry_after == 1.0
                assert await store.get_lockout("login:ada|10.0.0.1") is None
            finally:
                await throttle.aclose()

    asyncio.run(main())


def test_the_scan_pattern_matches_a_prefix_with_glob_characters_literally() -> None:
    from bastion.security.throttle_redis_unlock import _glob

    assert _glob("bastion:[rl]*?\\:") == "bastion:\\[rl\\]\\*\\?\\\\:"


def test_an_unlock_on_one_worker_forgets_the_users_failures_on_the_other(tmp_path: Path) -> None:
    """With ``--workers`` and no Redis the failure counts are in the shared table, where no list of the
    user's sources is kept: the unlock renews the user's generation, and every count of theirs is forgotten
    -- also of a source the store no longer names (``delete_user`` deleted its rows first)."""

    async def main() -> None:
        shared = SharedTable.create(1000)
        async with open_store(tmp_path / "s.db") as store:
            one, two = (LoginThrottle(store, max_failures=3, lockout=300, shared=shared) for _ in range(2))
            assert [await one.failed("bob", "10.0.0.9") for _ in range(2)] == [False, False]
            await one.failed("bobby", "10.0.0.9")
            await one.failed("bobby", "10.0.0.9")
            await store.delete_lockouts("bob")  # (as delete_user leaves it: no rows naming the source)
            assert await two.unlock("bob") == 0
            assert [await one.failed("bob", "10.0.0.9") for _ in range(3)] == [False, False, True]
            assert await two.failed("bobby", "10.0.0.9") is True  # nobody else's forgotten

    asyncio.run(main())


def test_an_unlock_without_refill_keeps_the_users_allowance_spent(tmp_path: Path) -> None:
    """``auth.unlock_user`` (``refill=False``): the password stays the same, so a distributed guessing campaign
    that spent the per-user allowance gets no fresh one -- in memory and in the workers' shared table; the
    lockouts and failure counts go all the same."""

    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            for shared in (None, SharedTable.create(1000)):
                user = "bob" if shared is None else "bea"
                throttle = LoginThrottle(store, max_failures=2, global_per_hour=2, shared=shared)
                await _lock(throttle, user, "10.0.1.1", 2)
                assert "for this user" in (await refused(throttle, user, "10.0.2.1") or "")
                assert await throttle.unlock(user, refill=False) == 1
                assert await refused(throttle, user, "10.0.1.1") is not None  # (the allowance, not the lockout)
                assert "for this user" in (await refused(throttle, user, "10.0.2.1") or "")
                assert await store.get_lockout(f"login:{user}|10.0.1.1") is None
                assert await throttle.unlock(user) == 0
                assert await refused(throttle, user, "10.0.2.1") is None

    asyncio.run(main())


@needs_redis
def test_an_unlock_without_refill_keeps_the_users_allowance_in_redis(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, a: LoginThrottle, b: LoginThrottle) -> None:
        await _lock(a, "ada", "10.0.0.1", 2)
        assert await b.unlock("ada", refill=False) == 1
        left = sorted([key.decode()[len(prefix) :] async for key in client.scan_iter(match=prefix + "{login}:[flu]:*")])
        assert left == ["{login}:u:ada"]
        assert "for this user" in (await refused(b, "ada", "10.0.2.1") or "")

    replicas(tmp_path, body, max_failures=2, lockout=60, global_per_hour=2)
