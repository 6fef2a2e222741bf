"""The login throttle in Redis: failures whose answers were lost, and the lockouts they decide (settling).

Replica ``a`` talks to Redis through a relay (``through_relay``) that can hold back or drop its answers;
``b`` talks to Redis directly; both share one store. Needs BASTION_TEST_REDIS_URL, as test_throttle_redis.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from bastion.exceptions import ResourceExhausted
from bastion.security.throttle import LoginThrottle
from tests.security.test_throttle_redis import Clock, needs_redis, refused, through_relay, until


@needs_redis
def test_a_bad_token_failure_whose_answer_was_lost_is_not_charged_twice(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        relay.mode = "stall"  # the failure runs in Redis (1 of the source's 3 tokens spent), its answer lost
        assert await a.failed(None, "10.0.0.1") is False
        relay.mode = "pass"
        assert a._redis is not None
        assert not a._redis._unsettled, "a bad token's failure (not idempotent) is kept to be run again"

        async def answered() -> bool:
            await a.check("zed", "10.0.0.9")
            assert a._redis is not None
            return a._redis._gate.healthy

        assert await until(answered)
        tokens = await client.hget(f"{prefix}{{login}}:s:10.0.0.1", "t")
        assert float(tokens) == 2.0  # charged once in Redis

    through_relay(tmp_path, body, timeout=0.3, burst=3)


async def lockout_written(throttle: LoginThrottle, username: str, source: str) -> bool:
    """Whether the store holds a live lockout of the pair (whatever Redis says)."""
    until_ = await throttle._store.get_lockout(f"login:{username}|{source}")
    return until_ is not None and until_ > throttle._clock()


async def lose_a_locking_answer(relay: Any, a: LoginThrottle) -> None:
    """Two failures of (ada, 10.0.0.1) counted, then a third that locks the pair in Redis, its answer lost;
    then Redis answers ``a`` again (another login probes it back). Needs max_failures=3."""
    for _ in range(2):
        assert await a.failed("ada", "10.0.0.1") is False
    relay.mode = "stall"
    assert await a.failed("ada", "10.0.0.1") is False
    relay.mode = "pass"

    async def answered() -> bool:
        await a.check("zed", "10.0.0.9")
        assert a._redis is not None
        return a._redis._gate.healthy

    assert await until(answered)


@needs_redis
def test_a_login_cancelled_while_writing_the_lockout_its_settling_learnt_still_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bastion.security.throttle_redis as throttle_redis

    monkeypatch.setattr(throttle_redis, "RETRY_AFTER", 60.0)  # the settler asleep: the login settles it

    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        assert a._redis is not None
        writing = asyncio.Event()
        real = a._redis.on_lock
        assert real is not None

        async def slow_lock(username: str, source: str) -> None:
            writing.set()
            await asyncio.sleep(0.2)  # a slow store write
            await real(username, source)

        a._redis.on_lock = slow_lock
        await lose_a_locking_answer(relay, a)

        async def login() -> None:
            async with a.attempt("ada", "10.0.0.1"):
                pass

        task = asyncio.create_task(login())
        await writing.wait()  # its settling learnt the lockout and is writing it
        task.cancel()  # the client drops
        with pytest.raises(asyncio.CancelledError):
            await task

        async def written() -> bool:
            return await lockout_written(b, "ada", "10.0.0.1")

        assert await until(written), "the lockout was lost with the cancelled login"

    through_relay(tmp_path, body, timeout=0.3, max_failures=3)


@needs_redis
def test_a_lockout_whose_write_failed_while_settling_is_written_when_the_store_answers(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        assert a._redis is not None
        real = a._redis.on_lock
        assert real is not None
        calls = 0

        async def flaky_lock(username: str, source: str) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise OSError("the store is unavailable")
            await real(username, source)

        a._redis.on_lock = flaky_lock
        await lose_a_locking_answer(relay, a)

        async def written() -> bool:
            return await lockout_written(b, "ada", "10.0.0.1")

        assert await until(written, 10.0), "the failure was forgotten when writing its lockout failed"
        assert calls == 2

    through_relay(tmp_path, body, timeout=0.3, max_failures=3)


@needs_redis
def test_a_login_cancelled_while_writing_the_lockout_its_failure_decided_still_writes_it(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        writing = asyncio.Event()
        real = a._lock

        async def slow_lock(username: str, source: str) -> None:
            writing.set()
            await asyncio.sleep(0.2)  # a slow store write
            await real(username, source)

        a._lock = slow_lock  # type: ignore[method-assign]
        assert await a.failed("ada", "10.0.0.1") is False
        task = asyncio.create_task(a.failed("ada", "10.0.0.1"))  # locks the pair (2 of 2)
        await writing.wait()
        task.cancel()  # the client drops
        with pytest.raises(asyncio.CancelledError):
            await task

        async def written() -> bool:
            return await lockout_written(b, "ada", "10.0.0.1")

        assert await until(written), "the lockout was lost with the cancelled login"

    through_relay(tmp_path, body, max_failures=2)


@needs_redis
def test_the_login_that_finds_redis_back_runs_its_pairs_lost_failure_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import bastion.security.throttle_redis as throttle_redis

    monkeypatch.setattr(throttle_redis, "RETRY_AFTER", 60.0)  # the settler asleep: the login probes Redis

    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        assert a._redis is not None
        gate = a._redis._gate
        for _ in range(2):
            assert await a.failed("ada", "10.0.0.1") is False
        relay.mode = "stall"  # the third locks the pair in Redis (its count gone); its answer is lost
        assert await a.failed("ada", "10.0.0.1") is False
        relay.mode = "pass"

        async def may_probe() -> bool:  # Redis not asked for RETRY_AFTER after failing; then it is
            return time.monotonic() >= gate._down_until

        assert await until(may_probe)
        assert not gate.healthy and a._redis._unsettled
        with pytest.raises(ResourceExhausted, match="too many failed attempts"):
            async with a.attempt("ada", "10.0.0.1"):  # the pair's next guess, the one that finds Redis back
                raise AssertionError("a guess verified though Redis had decided the pair's lockout")

    through_relay(tmp_path, body, timeout=0.3, max_failures=3)


@needs_redis
def test_every_replica_refuses_a_locked_pair_at_once_even_before_the_lockout_is_in_the_store(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        writing, store_back = asyncio.Event(), asyncio.Event()
        real = a._lock

        async def hanging_lock(username: str, source: str) -> None:
            writing.set()
            await store_back.wait()  # the store write hangs (a store under load)
            await real(username, source)

        a._lock = hanging_lock  # type: ignore[method-assign]
        assert await a.failed("ada", "10.0.0.1") is False
        task = asyncio.create_task(a.failed("ada", "10.0.0.1"))  # locks the pair (2 of 2) in Redis
        await writing.wait()
        assert not await lockout_written(b, "ada", "10.0.0.1")
        for throttle in (a, b):
            with pytest.raises(ResourceExhausted, match="too many failed attempts; try again later") as info:
                async with throttle.attempt("ada", "10.0.0.1"):
                    raise AssertionError("a guess verified while the lockout was being written")
            assert 0 < info.value.retry_after <= 60
        assert await refused(b, "ada", "10.0.0.2") is None  # elsewhere she is fine
        store_back.set()
        assert await task is True
        clock.now += 61  # the lockout is over, in Redis as in the store
        async with b.attempt("ada", "10.0.0.1"):
            pass

    through_relay(tmp_path, body, max_failures=2, lockout=60)


@needs_redis
def test_closing_settles_the_failures_whose_answers_were_lost_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bastion.security.throttle_redis as throttle_redis

    monkeypatch.setattr(throttle_redis, "RETRY_AFTER", 60.0)  # the settler asleep as the server stops

    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        assert a._redis is not None
        await lose_a_locking_answer(relay, a)
        assert a._redis._unsettled and not await lockout_written(b, "ada", "10.0.0.1")
        await a.aclose()  # a restart
        assert await lockout_written(b, "ada", "10.0.0.1"), "the lockout was dropped with the unsettled failure"
        assert not a._redis._unsettled

    through_relay(tmp_path, body, timeout=0.3, max_failures=3)


@needs_redis
def test_closing_waits_for_a_lockout_write_that_outlasts_settling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aclose`` used to give up on a lockout write still running once settling ran out of time: the store
    closed under it, and the lockout was lost with the restart."""
    import bastion.security.throttle_redis as throttle_redis

    monkeypatch.setattr(throttle_redis, "RETRY_AFTER", 60.0)  # the settler asleep as the server stops

    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        assert a._redis is not None
        real = a._redis.on_lock
        assert real is not None

        async def slow_lock(username: str, source: str) -> None:
            await asyncio.sleep(0.5)  # a slow store write, longer than settling may take
            await real(username, source)

        a._redis.on_lock = slow_lock
        a._redis.close_timeout = 0.2
        await lose_a_locking_answer(relay, a)
        await a.aclose()  # a restart
        assert await lockout_written(b, "ada", "10.0.0.1"), "the lockout write was abandoned at shutdown"
        assert not a._redis._locking

    through_relay(tmp_path, body, timeout=0.3, max_failures=3)


@needs_redis
def test_a_lockout_write_failing_while_settling_is_logged_within_the_budget_and_written_only_once_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The settler used to log "lockout written now" before the write, and a warning with a traceback every half
    second while the store was down: outside the log budget, and saying a lockout was written that was not."""

    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        assert a._redis is not None
        real = a._redis.on_lock
        assert real is not None
        calls = 0
        store_down = True

        async def failing_lock(username: str, source: str) -> None:
            nonlocal calls
            calls += 1
            if store_down:
                raise sqlite3.OperationalError("database is locked")
            await real(username, source)

        a._redis.on_lock = failing_lock
        await lose_a_locking_answer(relay, a)

        async def tried_often() -> bool:
            return calls >= 4  # rounds of the settler, half a second apart

        assert await until(tried_often, 10.0)
        lines = [r.getMessage() for r in caplog.records if r.name == "bastion.throttle"]
        assert not [line for line in lines if "written" in line], lines
        assert len([line for line in lines if "settling" in line]) == 1, lines
        store_down = False

        def logged() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "bastion.throttle"]

        async def written() -> bool:  # the row, then the line logged once it is written (a moment after)
            return await lockout_written(b, "ada", "10.0.0.1") and any("lockout written" in x for x in logged())

        assert await until(written, 10.0), logged()
        assert len([line for line in logged() if "lockout written" in line]) == 1, logged()

    with caplog.at_level(logging.WARNING, logger="bastion.throttle"):
        through_relay(tmp_path, body, timeout=0.3, max_failures=3)


@needs_redis
def test_closing_the_throttle_takes_one_budget_below_the_supervisors_kill_margin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LoginThrottle.aclose`` used to wait up to 5 s for its own writes, then Redis's settling its
    ``close_timeout`` and its writes 5 s more: a worker whose drain had used the grace was SIGKILLed
    (``KILL_MARGIN``) in the middle. Now ``CLOSE_TIMEOUT`` in all, below the margin, however long a write
    hangs."""
    import bastion.security.throttle_redis as throttle_redis
    from bastion.security.throttle import CLOSE_TIMEOUT
    from bastion.server.supervisor import KILL_MARGIN

    assert CLOSE_TIMEOUT < KILL_MARGIN
    monkeypatch.setattr(throttle_redis, "RETRY_AFTER", 60.0)  # the settler asleep as the server stops

    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        assert a._redis is not None

        async def hung_lock(username: str, source: str) -> None:
            await asyncio.Event().wait()  # a store write that never ends

        a._redis.on_lock = hung_lock
        await lose_a_locking_answer(relay, a)
        started = time.monotonic()
        await a.aclose()
        assert time.monotonic() - started < CLOSE_TIMEOUT + 0.5
        for task in a._redis._locking.values():
            task.cancel()

    through_relay(tmp_path, body, timeout=0.3, max_failures=3)
