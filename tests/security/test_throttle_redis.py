"""The login throttle with its counts in Redis: replicas share one budget; what happens when Redis fails.

Needs a Redis server at BASTION_TEST_REDIS_URL (CI: redis://127.0.0.1:6379/0) for all but the tests of a
dead Redis; each test uses a key prefix of its own and deletes its keys. Two ``LoginThrottle`` objects on
one store and one prefix stand for two replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bastion.exceptions import ResourceExhausted, Unavailable
from bastion.security.throttle import LoginThrottle
from bastion.security.throttle_redis import HOLD_SECONDS
from bastion.store import open_store

redis_asyncio = pytest.importorskip("redis.asyncio", reason="the redis package is not installed")

URL = os.environ.get("BASTION_TEST_REDIS_URL", "")
needs_redis = pytest.mark.skipif(
    not URL, reason="BASTION_TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0, as CI sets it)"
)
DEAD_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Body = Callable[..., Awaitable[None]]


def replicas(tmp_path: Path, body: Body, n: int = 2, **options: Any) -> None:
    """Run ``body(clock, client, prefix, *throttles)``: ``n`` throttles on one store and one Redis prefix."""

    async def main() -> None:
        prefix = f"bastion:test:{uuid.uuid4().hex}:"
        clock = Clock()
        client = redis_asyncio.Redis.from_url(URL)
        async with open_store(tmp_path / "s.db") as store:
            throttles = [
                LoginThrottle(
                    store,
                    clock=clock,
                    redis_url=URL,
                    redis_prefix=prefix,
                    redis_timeout=5.0,
                    redis_time=False,
                    **options,
                )
                for _ in range(n)
            ]
            try:
                await body(clock, client, prefix, *throttles)
            finally:
                for throttle in throttles:
                    await throttle.aclose()
                keys = [key async for key in client.scan_iter(match=prefix + "*")]
                if keys:
                    await client.delete(*keys)
                await client.aclose()

    asyncio.run(main())


async def refused(throttle: LoginThrottle, username: str | None, source: str) -> str | None:
    """The refusal ``check`` answers (None: none)."""
    try:
        await throttle.check(username, source)
    except ResourceExhausted as exc:
        return str(exc)
    return None


@needs_redis
def test_failures_alternating_over_two_replicas_lock_the_pair_after_max_failures_in_all(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, a: LoginThrottle, b: LoginThrottle) -> None:
        results = [await (a, b)[i % 2].failed("ada", "10.0.0.1") for i in range(4)]
        assert results == [False, False, False, True]
        for throttle in (a, b):
            assert await refused(throttle, "ada", "10.0.0.1") == "too many failed attempts; try again later"
            assert await refused(throttle, "ada", "10.0.0.2") is None  # elsewhere she is fine

    replicas(tmp_path, body, max_failures=4)


@needs_redis
def test_the_source_bucket_and_the_user_allowance_are_one_budget_across_replicas(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, a: LoginThrottle, b: LoginThrottle) -> None:
        for i in range(3):  # token failures from one address, spread over both
            await (a, b)[i % 2].failed(None, "10.0.0.1")
        for throttle in (a, b):
            assert await refused(throttle, None, "10.0.0.1") == "too many failed attempts from this address"
        for i in range(2):  # one user's allowance, from two other addresses
            await (a, b)[i].failed("bob", f"10.0.1.{i}")
        for throttle in (a, b):
            assert "for this user" in (await refused(throttle, "bob", "10.0.2.1") or "")

    replicas(tmp_path, body, burst=3, global_per_hour=2, max_failures=10)


@needs_redis
def test_a_success_forgives_and_failure_counts_expire_after_the_lockout_window(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, a: LoginThrottle, b: LoginThrottle) -> None:
        await a.failed("ada", "10.0.0.1")
        await b.failed("ada", "10.0.0.1")
        keys = [key async for key in client.scan_iter(match=prefix + "*f:ada|10.0.0.1")]
        assert len(keys) == 1 and 0 < await client.pttl(keys[0]) <= 60_000  # forgotten 60 s after the last
        await b.succeeded("ada", "10.0.0.1")
        assert not await client.exists(keys[0])
        assert [await a.failed("ada", "10.0.0.1") for _ in range(3)] == [False, False, True]

    replicas(tmp_path, body, max_failures=3, lockout=60)


@needs_redis
def test_an_attempt_pending_on_one_replica_counts_on_the_other_until_released_or_expired(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, a: LoginThrottle, b: LoginThrottle) -> None:
        async def attempts(throttle: LoginThrottle) -> AsyncIterator[None]:
            async with throttle.attempt("ada", "10.0.0.1"):
                yield

        held = attempts(a)
        await anext(held)  # in flight on a
        with pytest.raises(ResourceExhausted, match="at once") as info:
            async with b.attempt("ada", "10.0.0.1"):
                pass
        assert info.value.retry_after == 1.0
        with pytest.raises(StopAsyncIteration):
            await anext(held)  # released
        async with b.attempt("ada", "10.0.0.1"):
            pass
        crashed = attempts(a)
        await anext(crashed)  # a replica that dies now never releases it ...
        clock.now += HOLD_SECONDS + 1
        async with b.attempt("ada", "10.0.0.1"):  # ... and it stops counting after HOLD_SECONDS
            pass
        await crashed.aclose()
        assert not [key async for key in client.scan_iter(match=prefix + "{login}:p*")]

    replicas(tmp_path, body, max_failures=1)


def test_with_redis_down_the_throttle_limits_per_server_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=3, redis_url=DEAD_URL)
            try:
                for i in range(3):
                    async with throttle.attempt("ada", "10.0.0.1"):
                        assert await throttle.failed("ada", "10.0.0.1") is (i == 2)
                with pytest.raises(ResourceExhausted, match="too many failed attempts"):
                    await throttle.check("ada", "10.0.0.1")
            finally:
                await throttle.aclose()

    with caplog.at_level(logging.WARNING, logger="bastion.throttle"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.name == "bastion.throttle"]
    assert len(warnings) == 1 and "throttling per replica meanwhile" in warnings[0], warnings


def test_with_redis_down_and_fail_open_false_password_attempts_are_refused_tokens_are_not(tmp_path: Path) -> None:
    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, redis_url=DEAD_URL, redis_fail_open=False)
            try:
                with pytest.raises(Unavailable) as info:
                    async with throttle.attempt("ada", "10.0.0.1"):
                        raise AssertionError("let through")
                assert info.value.retry_after == 1.0
                with pytest.raises(Unavailable):
                    await throttle.check("ada", "10.0.0.1")
                await throttle.check(None, "10.0.0.1")  # a token handshake: this server's own limits
                assert await throttle.failed(None, "10.0.0.1") is False
            finally:
                await throttle.aclose()

    asyncio.run(main())


@needs_redis
def test_a_cancelled_attempt_leaves_nothing_pending_in_redis(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, a: LoginThrottle, b: LoginThrottle) -> None:
        entered = asyncio.Event()

        async def login() -> None:
            async with a.attempt("ada", "10.0.0.1"):
                entered.set()
                await asyncio.Event().wait()  # a dropped connection cancels it here

        task = asyncio.create_task(login())
        await entered.wait()
        assert await refused(b, "ada", "10.0.0.1") is not None  # held
        assert len([key async for key in client.scan_iter(match=prefix + "{login}:p*")]) == 3  # pair, source, user
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await refused(b, "ada", "10.0.0.1") is None
        assert not [key async for key in client.scan_iter(match=prefix + "{login}:p*")]

    replicas(tmp_path, body, max_failures=1)


async def pending_keys(client: Any, prefix: str) -> list[Any]:
    return [key async for key in client.scan_iter(match=prefix + "{login}:p*")]


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; whether it held."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def through_relay(tmp_path: Path, body: Callable[..., Awaitable[None]], timeout: float = 5.0, **options: Any) -> None:
    """Run ``body(clock, client, prefix, relay, a, b)``: replica ``a`` talks to Redis through ``relay``
    (a RedisRelay; Redis's answers time out after ``timeout``), ``b`` directly; one store, one prefix.
    ``a`` has asked Redis once already (connected, scripts loaded)."""
    from urllib.parse import urlsplit

    from tests.support.redis_relay import RedisRelay

    target = urlsplit(URL)

    async def main() -> None:
        prefix = f"bastion:test:{uuid.uuid4().hex}:"
        clock = Clock()
        client = redis_asyncio.Redis.from_url(URL)
        async with RedisRelay(target.hostname or "127.0.0.1", target.port or 6379) as relay:
            db = int((target.path or "/0").lstrip("/") or 0)
            async with open_store(tmp_path / "s.db") as store:
                kw: dict[str, Any] = {"clock": clock, "redis_prefix": prefix, "redis_time": False, **options}
                a = LoginThrottle(store, redis_url=relay.url(db), redis_timeout=timeout, **kw)
                b = LoginThrottle(store, redis_url=URL, redis_timeout=5.0, **kw)
                try:
                    await a.check("ada", "10.0.0.1")
                    await body(clock, client, prefix, relay, a, b)
                finally:
                    relay.mode = "pass"
                    for throttle in (a, b):
                        await throttle.aclose()
                    keys = [key async for key in client.scan_iter(match=prefix + "*")]
                    if keys:
                        await client.delete(*keys)
                    await client.aclose()

    asyncio.run(main())


@needs_redis
def test_an_attempt_cancelled_after_redis_held_it_but_before_the_answer_came_leaves_nothing(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        async def login() -> None:
            async with a.attempt("ada", "10.0.0.1"):
                raise AssertionError("the answer was held back")

        relay.mode = "stall"  # LIMITS runs in Redis; its answer does not come back
        task = asyncio.create_task(login())

        async def held() -> bool:
            return len(await pending_keys(client, prefix)) == 3

        assert await until(held)
        task.cancel()  # the client dropped mid-login
        with pytest.raises(asyncio.CancelledError):
            await task
        relay.mode = "pass"

        async def released() -> bool:
            return not await pending_keys(client, prefix)

        assert await until(released), "the holds outlive the cancelled attempt"
        assert await refused(b, "ada", "10.0.0.1") is None

    through_relay(tmp_path, body, max_failures=1)


@needs_redis
def test_an_attempt_whose_answer_timed_out_after_redis_held_it_is_released_once_redis_answers(
    tmp_path: Path,
) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        relay.mode = "stall"
        async with a.attempt("ada", "10.0.0.1"):  # no answer in time: this server's own limits meanwhile
            assert len(await pending_keys(client, prefix)) == 3  # though Redis holds it
        relay.mode = "pass"

        async def released() -> bool:
            await a.check("bob", "10.0.0.9")  # some later login: Redis is asked again, and answers
            return not await pending_keys(client, prefix)

        assert await until(released, 20.0), "the holds outlive the attempt whose answer was lost"
        assert await refused(b, "ada", "10.0.0.1") is None

    through_relay(tmp_path, body, timeout=0.3, max_failures=1)


@needs_redis
def test_a_success_while_redis_fails_forgives_the_pair_in_redis_once_it_answers_again(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        for _ in range(2):
            assert await a.failed("ada", "10.0.0.1") is False  # 2 of 3, counted in Redis
        relay.mode = "drop"  # Redis fails ...
        await a.succeeded("ada", "10.0.0.1")  # ... as the user logs in: forgiven here only, for now
        relay.mode = "pass"

        async def forgiven() -> bool:
            await a.check("bob", "10.0.0.9")  # some later login: Redis is asked again, and answers
            return not [key async for key in client.scan_iter(match=prefix + "{login}:f:*")]

        assert await until(forgiven, 20.0), "the pair's failures outlive the success"
        assert await b.failed("ada", "10.0.0.1") is False  # one typo later: no lockout

    through_relay(tmp_path, body, timeout=0.3, max_failures=3, lockout=60)


@needs_redis
def test_an_attempt_in_flight_longer_than_hold_seconds_still_counts_on_the_other_replica(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, a: LoginThrottle, b: LoginThrottle) -> None:
        assert a._redis is not None
        a._redis.refresh_every = 0.02  # (HOLD_SECONDS / 3 in service: the fake clock jumps here)
        held = a.attempt("ada", "10.0.0.1")
        await held.__aenter__()  # verifying, slowly: argon2 queued under load
        pair = f"{prefix}{{login}}:pp:ada|10.0.0.1"
        for _ in range(3):  # 3 x (HOLD_SECONDS - 5) in flight
            clock.now += HOLD_SECONDS - 5

            async def refreshed() -> bool:
                scores = [score for _, score in await client.zrange(pair, 0, -1, withscores=True)]
                return len(scores) == 1 and scores[0] >= clock.now + HOLD_SECONDS - 1

            assert await until(refreshed), "the hold was not kept while the attempt was in flight"
        with pytest.raises(ResourceExhausted, match="at once"):
            async with b.attempt("ada", "10.0.0.1"):
                pass
        await held.__aexit__(None, None, None)
        async with b.attempt("ada", "10.0.0.1"):
            pass
        assert not await pending_keys(client, prefix)

    replicas(tmp_path, body, max_failures=1)


LOCKED = "too many failed attempts; try again later"


@needs_redis
def test_a_failure_whose_answer_was_lost_after_it_locked_the_pair_in_redis_still_locks_it(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        for _ in range(2):
            assert await a.failed("ada", "10.0.0.1") is False  # 2 of 3, counted in Redis
        relay.mode = "stall"  # the third runs in Redis -- the count is gone, the lockout decided -- ...
        assert await a.failed("ada", "10.0.0.1") is False  # ... but its answer is lost: counted here meanwhile
        relay.mode = "pass"

        assert await refused(b, "ada", "10.0.0.1") == LOCKED  # Redis has it at once (b asks it)

        async def locked() -> bool:  # (no login asks Redis meanwhile: it is asked again all the same)
            return await a._store.get_lockout("login:ada|10.0.0.1") is not None

        assert await until(locked, 10.0), "the lockout decided in Redis was lost with its answer"
        assert await refused(a, "ada", "10.0.0.1") == LOCKED

    through_relay(tmp_path, body, timeout=0.3, max_failures=3)


@needs_redis
def test_a_failure_whose_command_never_reached_redis_is_counted_there_once_it_answers(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        assert await a.failed("ada", "10.0.0.1") is False  # 1 of 2, counted in Redis
        relay.mode = "drop"  # Redis does not answer (nor run it): counted here meanwhile
        assert await a.failed("ada", "10.0.0.1") is False
        relay.mode = "pass"

        async def locked() -> bool:
            return await refused(b, "ada", "10.0.0.1") == LOCKED

        assert await until(locked, 10.0), "the failure Redis never saw was counted nowhere but here"

    through_relay(tmp_path, body, timeout=0.3, max_failures=2)


@needs_redis
def test_a_failure_run_again_after_its_answer_was_lost_is_counted_once(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        relay.mode = "stall"  # runs (1 of 3), its answer lost
        assert await a.failed("ada", "10.0.0.1") is False
        relay.mode = "pass"

        async def settled() -> bool:
            assert a._redis is not None
            return not a._redis._unsettled

        assert await until(settled, 10.0)
        assert await client.get(f"{prefix}{{login}}:f:ada|10.0.0.1") == b"1"  # run twice, counted once
        assert await b.failed("ada", "10.0.0.1") is False
        assert await b.failed("ada", "10.0.0.1") is True

    through_relay(tmp_path, body, timeout=0.3, max_failures=3)


@needs_redis
def test_a_login_cancelled_while_its_failure_was_being_counted_still_counts_it(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        assert await a.failed("ada", "10.0.0.1") is False  # 1 of 2
        relay.mode = "stall"  # the second runs in Redis (the lockout decided), and the client drops meanwhile
        task = asyncio.create_task(a.failed("ada", "10.0.0.1"))

        async def ran() -> bool:  # the pair's count is gone: it reached 2
            return await client.get(f"{prefix}{{login}}:f:ada|10.0.0.1") is None

        assert await until(ran)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        relay.mode = "pass"

        async def locked() -> bool:
            return await refused(b, "ada", "10.0.0.1") == LOCKED

        assert await until(locked, 10.0), "the lockout the cancelled login's failure decided was lost"

    through_relay(tmp_path, body, timeout=5.0, max_failures=2)
