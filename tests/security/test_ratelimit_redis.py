"""The Redis-backed rate limiter: one budget shared by replicas, atomically.

Tests that need a server read BASTION_TEST_REDIS_URL (CI: redis://127.0.0.1:6379/0)
and are skipped without it. Each test uses its own random key prefix and
deletes only its own keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
import pytest

from bastion.exceptions import ResourceExhausted, Unavailable, UsageError
from bastion.security.principal import ANONYMOUS, Principal
from bastion.security.ratelimit import Limit, Limiter, RateLimitConfig, RateLimiter, RateRule, create_limiter

redis = pytest.importorskip("redis", reason="the redis package is not installed (pip install 'bastion[redis]')")
redis_asyncio = pytest.importorskip("redis.asyncio")

from bastion.security.ratelimit_redis import SCRIPT, RedisRateLimiter, check_url  # noqa: E402

URL = os.environ.get("BASTION_TEST_REDIS_URL", "")
needs_redis = pytest.mark.skipif(
    not URL, reason="BASTION_TEST_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0, as CI sets it)"
)
DEAD_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1

ADA = Principal("ada", frozenset({"user"}))
BIG = Limit(rate=1e6, burst=1e6)

Body = Callable[..., Awaitable[None]]


def run_with(config: RateLimitConfig, replicas: int, body: Body) -> None:
    """Run ``body(prefix, client, *limiters)``: ``replicas`` limiters with their own connections, one prefix."""

    async def main() -> None:
        prefix = f"bastion:rl:test:{uuid.uuid4().hex}:"
        client = redis_asyncio.Redis.from_url(URL)
        # These tests check what is counted, not latency: a loaded CI machine must not time them out.
        patient = msgspec.structs.replace(config, redis_timeout=5.0)
        limiters = [RedisRateLimiter.from_url(URL, patient, prefix=prefix, fail_open=False) for _ in range(replicas)]
        try:
            await body(prefix, client, *limiters)
        finally:
            keys = [key async for key in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(*keys)
            for limiter in limiters:
                await limiter.aclose()
            await client.aclose()

    asyncio.run(main())


async def passes(limiter: RedisRateLimiter, principal: Principal = ADA, method: str = "kv.get", **kw: Any) -> bool:
    try:
        await limiter.check(principal, kw.pop("source", "10.0.0.1"), method, **kw)
    except ResourceExhausted:
        return False
    return True


@needs_redis
def test_two_replicas_share_one_budget_exactly() -> None:
    config = RateLimitConfig(per_principal=Limit(rate=1, burst=100))

    async def body(prefix: str, client: Any, one: RedisRateLimiter, two: RedisRateLimiter) -> None:
        calls = [passes(one if i % 2 else two, now=1000.0) for i in range(200)]  # concurrently, interleaved
        results = await asyncio.gather(*calls)
        assert sum(results) == 100
        assert await passes(one, now=1001.0) and not await passes(two, now=1001.0)  # one refilled at 1/s

    run_with(config, 2, body)


@needs_redis
def test_replicas_share_the_budget_on_redis_time() -> None:
    config = RateLimitConfig(per_principal=Limit(rate=0.001, burst=100))

    async def body(prefix: str, client: Any, *replicas: RedisRateLimiter) -> None:
        results = await asyncio.gather(*(passes(replicas[i % 4]) for i in range(200)))
        assert sum(results) == 100

    run_with(config, 4, body)


@needs_redis
def test_retry_after_and_the_refusal_name_the_limit() -> None:
    config = RateLimitConfig(per_principal=Limit(rate=5, burst=10))

    async def body(prefix: str, client: Any, limiter: RedisRateLimiter) -> None:
        for _ in range(9):
            assert await passes(limiter, now=0.0)
        with pytest.raises(ResourceExhausted) as info:
            await limiter.check(ADA, "10.0.0.1", "kv.get", cost=3, now=0.0)  # 1 left, 2 missing at 5/s
        assert info.value.retry_after == pytest.approx(0.4)
        assert "per-principal limit" in info.value.message
        assert info.value.details == {"limit": "per-principal limit", "rate": 5.0, "burst": 10.0, "cost": 3.0}
        assert not await passes(limiter, cost=3, now=0.39)
        assert await passes(limiter, cost=3, now=0.4)

    run_with(config, 1, body)


@needs_redis
def test_keys_are_prefixed_hash_tagged_and_expire_once_refilled() -> None:
    config = RateLimitConfig(
        per_principal=Limit(rate=10, burst=50), rules=[RateRule(method="kv.put", role="user", rate=2, burst=20)]
    )

    async def body(prefix: str, client: Any, limiter: RedisRateLimiter) -> None:
        assert await passes(limiter, method="kv.put")
        keys = sorted([key.decode() async for key in client.scan_iter(match=prefix + "*")])
        assert keys == [prefix + "{principal:ada}:principal", prefix + "{principal:ada}:rule:kv.put|user"]
        assert 0 < await client.pttl(keys[0]) <= 5000 + 1000  # 50 tokens at 10/s, plus a second
        assert 5000 + 1000 < await client.pttl(keys[1]) <= 10_000 + 1000  # 20 tokens at 2/s
        assert limiter.prefix.startswith("bastion:rl:")

    run_with(config, 1, body)


@needs_redis
def test_rules_roles_and_no_partial_debit_across_replicas() -> None:
    config = RateLimitConfig(
        per_principal=Limit(rate=1, burst=10), rules=[RateRule(method="kv.put", role="user", rate=1, burst=2)]
    )

    async def body(prefix: str, client: Any, one: RedisRateLimiter, two: RedisRateLimiter) -> None:
        results = [await passes(one if i % 2 else two, method="kv.put", now=0.0) for i in range(5)]
        assert results == [True, True, False, False, False]
        root = Principal("root", frozenset({"admin"}))
        assert all([await passes(two, root, "kv.put", now=0.0) for _ in range(5)])  # the user rule is not root's
        report = await one.usage(ADA, "10.0.0.1", now=0.0)
        assert report["identity"] == "principal:ada"
        assert [(e["limit"], e["tokens"]) for e in report["limits"]] == [
            ("per-principal limit", 8.0),  # the three refused calls took nothing
            ("limit on kv.put for role user", 0.0),
        ]
        assert (await two.usage(ADA, "10.0.0.1", now=1.5))["limits"][1]["tokens"] == 1.5

    run_with(config, 2, body)


@needs_redis
def test_usage_matches_the_in_memory_limiter() -> None:
    config = RateLimitConfig(
        per_principal=Limit(rate=10, burst=100),
        per_source=Limit(rate=1, burst=3),
        rules=[RateRule(method="kv.*", role="user", rate=5, burst=20), RateRule(method="*", rate=50, burst=60)],
        costs={"kv.scan": 4},
    )
    memory = RateLimiter(config)

    async def body(prefix: str, client: Any, limiter: RedisRateLimiter) -> None:
        for principal, method in [(ADA, "kv.scan"), (ADA, "kv.get"), (ANONYMOUS, "x"), (ANONYMOUS, "y")]:
            await limiter.check(principal, "192.0.2.1", method, now=10.0)
            await memory.check(principal, "192.0.2.1", method, now=10.0)
        for principal in (ADA, ANONYMOUS, Principal("nobody")):
            assert await limiter.usage(principal, "192.0.2.1", now=10.5) == memory.usage_sync(
                principal, "192.0.2.1", now=10.5
            )
        live = await limiter.usage(ADA, "192.0.2.1")  # on Redis's clock: long refilled
        assert [e["tokens"] for e in live["limits"]] == [100.0, 20.0, 60.0]

    run_with(config, 1, body)


@needs_redis
def test_anonymous_callers_are_limited_by_source_across_replicas() -> None:
    config = RateLimitConfig(per_source=Limit(rate=1, burst=3))

    async def body(prefix: str, client: Any, one: RedisRateLimiter, two: RedisRateLimiter) -> None:
        results = [await passes(r, ANONYMOUS, source="2001:db8::1", now=0.0) for r in (one, two, one, two)]
        assert results == [True, True, True, False]
        assert not await passes(one, ANONYMOUS, source="2001:db8::2", now=0.0)  # same /64
        assert await passes(two, ANONYMOUS, source="192.0.2.9", now=0.0)

    run_with(config, 2, body)


@needs_redis
def test_an_unloaded_script_is_loaded_and_retried() -> None:
    config = RateLimitConfig(per_principal=Limit(rate=1, burst=2))

    async def body(prefix: str, client: Any, limiter: RedisRateLimiter) -> None:
        script = SCRIPT + f"\n-- {uuid.uuid4().hex}\n"  # a script Redis has never seen: EVALSHA gets NOSCRIPT
        sha = hashlib.sha1(script.encode()).hexdigest()
        limiter._script = script  # run by its SHA-1, loaded when Redis says it does not know it
        assert await client.script_exists(sha) == [False]
        assert await passes(limiter, now=0.0)
        assert await client.script_exists(sha) == [True]
        assert await passes(limiter, now=0.0) and not await passes(limiter, now=0.0)

    run_with(config, 1, body)


@needs_redis
def test_create_limiter_picks_redis_from_the_config() -> None:
    async def main() -> None:
        prefix = f"bastion:rl:test:{uuid.uuid4().hex}:"
        config = RateLimitConfig(per_principal=Limit(rate=1, burst=1), redis_url=URL, redis_prefix=prefix)
        limiter = create_limiter(config)
        try:
            assert isinstance(limiter, RedisRateLimiter) and isinstance(limiter, Limiter)
            await limiter.check(ADA, "x", "kv.get")
            with pytest.raises(ResourceExhausted):
                await limiter.check(ADA, "x", "kv.get")
        finally:
            await limiter.aclose()
            client = redis_asyncio.Redis.from_url(URL)
            await client.delete(prefix + "{principal:ada}:principal")
            await client.aclose()

    asyncio.run(main())


# -- without a server -------------------------------------------------------------------------------


def test_an_unreachable_redis_fails_open_to_memory_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        config = RateLimitConfig(per_principal=Limit(rate=1, burst=2))
        async with RedisRateLimiter.from_url(DEAD_URL, config) as limiter:
            results = [await passes(limiter, now=0.0) for _ in range(4)]
            assert results == [True, True, False, False]  # still limited, per process
            report = await limiter.usage(ADA, "10.0.0.1", now=0.0)
            assert report["limits"][0]["tokens"] == 0.0

    with caplog.at_level(logging.WARNING, logger="bastion.ratelimit"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if r.name == "bastion.ratelimit"]
    assert len(warnings) == 1 and "limiting per process" in warnings[0].getMessage()


def test_an_unreachable_redis_fails_closed_when_configured() -> None:
    async def main() -> None:
        config = RateLimitConfig(redis_fail_open=False)
        async with RedisRateLimiter.from_url(DEAD_URL, config) as limiter:
            with pytest.raises(Unavailable) as info:
                await limiter.check(ADA, "x", "kv.get")
            assert info.value.retry_after == 1.0
            with pytest.raises(Unavailable):
                await limiter.usage(ADA, "x")

    asyncio.run(main())


def test_an_unreachable_redis_failing_closed_says_so_in_the_log_once(caplog: pytest.LogCaptureFixture) -> None:
    """Refusing every call UNAVAILABLE is the operator's to notice: before, nothing was logged."""

    async def main() -> None:
        async with RedisRateLimiter.from_url(DEAD_URL, RateLimitConfig(redis_fail_open=False)) as limiter:
            for _ in range(5):
                with pytest.raises(Unavailable):
                    await limiter.check(ADA, "x", "kv.get")

    with caplog.at_level(logging.WARNING, logger="bastion.ratelimit"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.name == "bastion.ratelimit"]
    assert len(warnings) == 1 and "refusing calls" in warnings[0], warnings


def test_refusals_that_need_no_redis_do_not_ask_it() -> None:
    async def main() -> None:
        config = RateLimitConfig(per_principal=Limit(rate=1, burst=5), costs={"health.check": 0}, redis_fail_open=False)
        async with RedisRateLimiter.from_url(DEAD_URL, config) as limiter:
            with pytest.raises(ResourceExhausted) as info:  # not Unavailable: Redis was never asked
                await limiter.check(ADA, "x", "kv.scan", cost=6)
            assert info.value.retry_after is None
            await limiter.check(ADA, "x", "health.check")  # free
            with pytest.raises(ValueError):
                await limiter.check(ADA, "x", "kv.get", cost=math.inf)
        async with RedisRateLimiter.from_url(DEAD_URL, RateLimitConfig(enabled=False, redis_fail_open=False)) as off:
            await off.check(ADA, "x", "kv.get")

    asyncio.run(main())


def test_without_the_redis_package_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(UsageError, match=r"pip install 'bastion\[redis\]'"):
        RedisRateLimiter.from_url("redis://127.0.0.1:6379/0")
    with pytest.raises(UsageError, match="redis package"):
        create_limiter(RateLimitConfig(redis_url="redis://127.0.0.1:6379/0"))


# -- a Redis of our own, stopped and killed ---------------------------------------------------------


@contextlib.contextmanager
def own_redis(tmp: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own on a free port (to stop or kill), and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("fail_open", [True, False], ids=["open", "closed"])
def test_a_stalled_redis_does_not_hold_up_every_call(tmp_path: Any, fail_open: bool) -> None:
    """A Redis that stops answering (SIGSTOP: a long fork, a partition) costs one timeout, not one per call."""

    async def main(url: str, proc: subprocess.Popen[bytes]) -> None:
        config = RateLimitConfig(per_principal=BIG, redis_timeout=0.25, redis_fail_open=fail_open)
        prefix = f"bastion:rl:test:{uuid.uuid4().hex}:"
        async with RedisRateLimiter.from_url(url, config, prefix=prefix) as limiter:
            await limiter.check(ADA, "x", "kv.get")  # Redis is up
            os.kill(proc.pid, signal.SIGSTOP)
            started = time.monotonic()
            for _ in range(20):  # each one waited out redis_timeout: 5 s at least
                try:
                    await limiter.check(ADA, "x", "kv.get")
                except Unavailable:
                    assert not fail_open
            assert time.monotonic() - started < 2.0
            os.kill(proc.pid, signal.SIGCONT)
            # Redis is asked again once it is back: the bucket there is charged (its stamp moves on).
            client = redis_asyncio.Redis.from_url(url)
            key = limiter.key(f"principal:{ADA.name}", limiter._compiled.all_for(ADA)[0])
            before = float(await client.hget(key, "s"))
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(Unavailable):
                    await limiter.check(ADA, "x", "kv.get")
                if float(await client.hget(key, "s")) > before:
                    break
                assert time.monotonic() < deadline, "the limiter never went back to Redis"
                await asyncio.sleep(0.05)
            await client.aclose()

    with own_redis(str(tmp_path)) as (url, proc):
        asyncio.run(main(url, proc))


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0?client_name=svc%40eu1",  # an @ meant in a query value, encoded
        "unix:///run/app@1/redis.sock?db=0",  # a socket path may hold an @
        "unix:///tmp/r.sock?password=p@ss",  # redis reads the password from the query
        "rediss://user:pw@host/0",
        "redis://u%40x:p%40ss@[::1]:6379/0",  # encoded, as the message asks
    ],
)
def test_a_redis_url_with_an_at_sign_that_cannot_end_its_host_early_is_accepted(url: str) -> None:
    check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3@cr/et@127.0.0.1:6379/0",  # a password's @ and /: urlsplit reads host "cr"
        "redis://:s3@cr?et@127.0.0.1:6379/0",  # ... and its ? likewise
        "rediss://:s3@cr#et@127.0.0.1:6379/0",
        "redis://:1234#s3cret@redis.prod:6379/0",  # no password: localhost:1234, shown as redis.prod
        "redis://:1234?x@redis.prod:6379/0",
    ],
)
def test_a_redis_url_whose_password_ends_the_host_early_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(UsageError, match="percent-encoded") as refused:
        check_url(url)
    assert "s3" not in str(refused.value)  # the URL, and so its password, is not shown
