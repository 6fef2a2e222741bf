"""Login throttling: per source, per (user, source) lockout, slow per-user global limit."""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path

import pytest

from bastion.exceptions import ResourceExhausted, UsageError
from bastion.security.throttle import LoginThrottle, LoginThrottled, TokenBucket
from bastion.store import open_store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(2, 1.0, now=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0


def test_failures_from_one_source_are_rate_limited_others_are_not(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, burst=10, rate=5, max_failures=1000, clock=clock)
            allowed = 0
            for _ in range(100):  # 10 seconds of attempts every 0.1 s
                try:
                    await throttle.check("victim", "127.0.0.2")
                except ResourceExhausted as exc:
                    assert exc.retry_after is not None and exc.retry_after > 0
                else:
                    allowed += 1
                    await throttle.failed("victim", "127.0.0.2")
                clock.now += 0.1
            assert allowed <= 10 + 5 * 10 + 1  # burst + rate x 10 s: at most ~6 a second
            await throttle.check("someone", "127.0.0.3")  # another source is untouched

    asyncio.run(main())


def test_lockout_is_per_user_and_source_and_expires(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=3, lockout=60, clock=clock)
            for i in range(3):
                locked = await throttle.failed("ada", "10.0.0.1")
                assert locked is (i == 2)
            with pytest.raises(ResourceExhausted):
                await throttle.check("ada", "10.0.0.1")
            await throttle.check("ada", "10.0.0.9")  # ada herself, elsewhere, is fine
            await throttle.check("bob", "10.0.0.1")
            clock.now += 61
            await throttle.check("ada", "10.0.0.1")

    asyncio.run(main())


def test_success_resets_the_failure_count(tmp_path: Path) -> None:
    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=3)
            await throttle.failed("ada", "h")
            await throttle.failed("ada", "h")
            await throttle.succeeded("ada", "h")
            assert await throttle.failed("ada", "h") is False

    asyncio.run(main())


def test_global_per_user_limit_slows_a_distributed_attack(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=1000, global_per_hour=5, clock=clock)
            for i in range(5):
                await throttle.check("ada", f"10.0.0.{i}")
                await throttle.failed("ada", f"10.0.0.{i}")
            with pytest.raises(ResourceExhausted):
                await throttle.check("ada", "10.0.1.1")
            clock.now += 3600 / 5
            await throttle.check("ada", "10.0.1.1")

    asyncio.run(main())


def test_a_distributed_attack_cannot_lock_a_user_out_of_a_source_they_logged_in_from(tmp_path: Path) -> None:
    """The per-user allowance is shared by every source: an attacker spending it from a few addresses
    (two suffice, each staying under its own lockout) must not keep the user out from everywhere.
    A source the user has logged in from lately still may try, under its own (username, source) lockout."""

    async def main() -> None:
        clock = Clock()
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=3, lockout=60, global_per_hour=5, clock=clock)
            await throttle.check("ada", "10.9.9.9")
            await throttle.succeeded("ada", "10.9.9.9")  # ada's own machine
            for i in range(5):
                await throttle.failed("ada", f"10.0.0.{i}")
            with pytest.raises(ResourceExhausted):
                await throttle.check("ada", "10.0.1.1")  # a new source: the allowance is spent
            clock.now += 24 * 3600
            for i in range(5):
                await throttle.failed("ada", f"10.0.2.{i}")
            await throttle.check("ada", "10.9.9.9")  # still known a day later, from a store any worker reads
            again = LoginThrottle(store, max_failures=3, lockout=60, global_per_hour=5, clock=clock)
            for i in range(5):
                await again.failed("ada", f"10.0.3.{i}")
            await again.check("ada", "10.9.9.9")
            for _ in range(3):  # but its own lockout holds: sharing ada's address is no free pass
                await again.failed("ada", "10.9.9.9")
            with pytest.raises(ResourceExhausted):
                await again.check("ada", "10.9.9.9")

    asyncio.run(main())


def test_a_wall_clock_stepping_back_locks_nobody_out(tmp_path: Path) -> None:
    """The throttle runs on the wall clock, which NTP or an operator may step back. One failed
    login, then the clock goes back an hour: before the fix the buckets owed the hour (5/s from
    the source's, 100/h from the user's), refusing that address for an hour and the user
    everywhere for over a minute; the shared buckets (several workers) already refilled nothing."""

    async def main() -> None:
        clock = Clock()
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, clock=clock)
            await throttle.check("ada", "10.0.0.1")
            await throttle.failed("ada", "10.0.0.1")  # a typo
            clock.now -= 3600
            await throttle.check("ada", "10.0.0.1")
            await throttle.check("ada", "10.0.0.9")
            await throttle.check("bob", "10.0.0.1")
            # Nor does going back refill: a source that spent its burst stays throttled.
            for _ in range(10):
                await throttle.failed(None, "10.0.0.2")
            with pytest.raises(ResourceExhausted):
                await throttle.check(None, "10.0.0.2")
            clock.now -= 60
            with pytest.raises(ResourceExhausted):
                await throttle.check(None, "10.0.0.2")

    asyncio.run(main())


def test_token_bucket_ignores_a_clock_stepping_back() -> None:
    bucket = TokenBucket(2, 1.0, now=100.0)
    assert bucket.take(100.0) == 0
    assert bucket.wait(40.0) == 0  # one token left, not 1 - 60
    assert bucket.take(40.0) == 0 and bucket.take(40.0) == pytest.approx(1.0)
    assert bucket.take(101.0) == 0  # refilled from the last stamp it saw (100), not from 40


@pytest.mark.parametrize(
    "options",
    [{"global_per_hour": 0}, {"burst": 0}, {"max_failures": 0}, {"rate": 0.0}, {"rate": math.inf}, {"lockout": -1.0}],
)
def test_limits_that_could_never_be_paid_are_a_usage_error(tmp_path: Path, options: dict[str, float]) -> None:
    """Before, global_per_hour=0 made every failed login raise ZeroDivisionError (answered INTERNAL,
    and every later attempt at that user too), and burst=0 refused an address for ever after one failure."""

    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            with pytest.raises(UsageError, match="at least 1"):
                LoginThrottle(store, **options)  # type: ignore[arg-type]

    asyncio.run(main())


def test_ipv6_sources_are_throttled_by_network_not_by_address(tmp_path: Path) -> None:
    """One host owns a whole /64 (as the rate limiter assumes): hopping addresses in it resets nothing."""

    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, burst=5, rate=1, max_failures=3, lockout=60, clock=Clock())
            allowed = 0
            for i in range(1, 50):  # one guess from each of 49 addresses of 2001:db8:1:2::/64, all at once
                try:
                    await throttle.check(f"user{i}", f"2001:db8:1:2::{i:x}")
                except ResourceExhausted:
                    continue
                allowed += 1
                await throttle.failed(f"user{i}", f"2001:db8:1:2::{i:x}")
            assert allowed == 5  # the source's burst, not one per address
            await throttle.check("someone", "2001:db8:1:3::1")  # the next /64 is someone else

            lock = LoginThrottle(store, max_failures=3, lockout=60, clock=Clock())
            for i in range(3):
                await lock.failed("ada", f"2001:db8:9:9::{i + 1}")
            with pytest.raises(ResourceExhausted):  # the (ada, /64) pair is locked, whichever address asks
                await lock.check("ada", "2001:db8:9:9::abcd")
            await lock.check("ada", "2001:db8:9:a::1")
            for _ in range(3):  # an IPv4 client is the same source as itself written IPv4-mapped
                await lock.failed("bob", "::ffff:10.0.0.7")
            with pytest.raises(ResourceExhausted):
                await lock.check("bob", "10.0.0.7")

    asyncio.run(main())


async def test_expired_lockouts_are_purged_a_bounded_batch_per_lockout(store_url: str) -> None:
    """A username spray leaves a lockout row per (user, source): expired ones must not pile up for ever."""
    from bastion.security.throttle import LOCKOUT_PURGE_BATCH

    clock = Clock()
    async with open_store(store_url) as store:
        throttle = LoginThrottle(store, burst=10_000, rate=1000, max_failures=1, lockout=60, clock=clock)
        sprayed = [f"user{i}" for i in range(LOCKOUT_PURGE_BATCH * 2 + 50)]
        for name in sprayed:
            assert await throttle.failed(name, "10.0.0.9")
        keys = [f"login:{name}|10.0.0.9" for name in sprayed]

        async def left() -> int:
            return sum([await store.get_lockout(key) is not None for key in keys])

        assert await left() == len(sprayed)
        clock.now += 30
        assert await throttle.failed("early", "10.0.0.9")  # nothing has expired yet: nothing goes
        assert await left() == len(sprayed)
        clock.now += 31  # the spray's lockouts have all expired; "early"'s has not
        assert await throttle.failed("later", "10.0.0.9")
        assert await left() == len(sprayed) - LOCKOUT_PURGE_BATCH  # one batch per write, not the whole table
        for n in range(2):
            assert await throttle.failed(f"later{n}", "10.0.0.9")
        assert await left() == 0
        for live in ("early", "later", "later0", "later1"):
            until = await store.get_lockout(f"login:{live}|10.0.0.9")
            assert until is not None and until > clock.now
            with pytest.raises(ResourceExhausted):
                await throttle.check(live, "10.0.0.9")


def test_logins_in_flight_never_refuse_token_handshakes_and_past_the_burst_are_refused_at_once(tmp_path: Path) -> None:
    """Logins in flight from one address (an office behind a NAT) once made a token handshake from it fail
    with "too many failed attempts from this address" though none had failed. They still count against the
    source's bucket (see the spray test below), but one refused for them alone is told "at once", and a
    token handshake tests the failures only."""

    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, burst=10, max_failures=3)
            async with contextlib.AsyncExitStack() as held:
                for i in range(10):
                    await held.enter_async_context(throttle.attempt(f"user{i}", "10.0.0.1"))
                await throttle.check(None, "10.0.0.1")  # a token handshake from the same address
                with pytest.raises(LoginThrottled, match="at once") as refused:
                    await held.enter_async_context(throttle.attempt("user10", "10.0.0.1"))
                assert "failed" not in str(refused.value) and 0 < (refused.value.retry_after or 0) <= 1.0
            await throttle.check("user10", "10.0.0.1")  # they succeeded (nothing failed): nothing is spent
            for _ in range(10):  # the bucket bounds failures
                await throttle.failed(None, "10.0.0.1")
            with pytest.raises(LoginThrottled, match="failed attempts from this address"):
                await throttle.check(None, "10.0.0.1")

    asyncio.run(main())


def test_a_spray_over_many_user_names_at_once_is_bounded_by_the_source_bucket(tmp_path: Path) -> None:
    """With pending attempts left out of the source's bucket, guesses sent at once over many user names
    were all verified while one token was left: 10,000 in two seconds from one address (burst 10)."""

    async def main() -> None:
        clock = Clock()
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, burst=10, rate=5, max_failures=3, clock=clock)
            verified = 0
            for _ in range(10):  # ten rounds of 100 names at once, 0.2 s apart (one token refilled each)
                async with contextlib.AsyncExitStack() as held:
                    admitted = []
                    for i in range(100):
                        with contextlib.suppress(LoginThrottled):
                            await held.enter_async_context(throttle.attempt(f"name{i}", "10.0.0.1"))
                            admitted.append(f"name{i}")
                    for name in admitted:  # every guess is wrong
                        await throttle.failed(name, "10.0.0.1")
                verified += len(admitted)
                clock.now += 0.2
            assert verified <= 10 + 10  # the burst, then one per refill

    asyncio.run(main())


def test_a_refusal_caused_by_attempts_in_flight_says_so(tmp_path: Path) -> None:
    """A refusal caused by concurrency (the pair's or the user's allowance spent only by attempts pending)
    must not claim failed attempts; one caused by failures still does. Nameless attempts (a username no
    user can have) are bounded per source in flight too."""

    async def main() -> None:
        clock = Clock()
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=1000, global_per_hour=3, clock=clock)
            async with contextlib.AsyncExitStack() as held:
                for i in range(3):
                    await held.enter_async_context(throttle.attempt("ada", f"10.0.0.{i}"))
                with pytest.raises(LoginThrottled, match="at once") as refused:
                    await throttle.check("ada", "10.0.1.1")
                assert "failed" not in str(refused.value)
            for i in range(3):
                await throttle.failed("ada", f"10.0.0.{i}")
            with pytest.raises(LoginThrottled, match="too many failed attempts"):
                await throttle.check("ada", "10.0.1.1")
            pair = LoginThrottle(store, max_failures=3, clock=clock)
            async with contextlib.AsyncExitStack() as held:
                for _ in range(3):
                    await held.enter_async_context(pair.attempt("bob", "10.0.0.9"))
                with pytest.raises(LoginThrottled, match="at once") as refused:
                    await pair.check("bob", "10.0.0.9")
                assert "failed" not in str(refused.value)
                for _ in range(3):
                    await held.enter_async_context(pair.attempt(None, "10.0.0.9"))
                with pytest.raises(LoginThrottled, match="at once"):
                    await held.enter_async_context(pair.attempt(None, "10.0.0.9"))
                await pair.check(None, "10.0.0.9")  # a token handshake: failures only

    asyncio.run(main())


def test_cancelled_attempts_leave_nothing_pending(tmp_path: Path) -> None:
    """Logins cancelled while held (a dropped connection, a deadline) -- inside the block or while the
    lockout is being read -- must release their pending count, or the pair would stay refused "at once"."""

    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=3, global_per_hour=3)
            forever = asyncio.Event()

            async def login() -> None:
                async with throttle.attempt("ada", "10.0.0.1"):
                    await forever.wait()

            for settle in (True, False):  # cancelled in the block; cancelled entering it
                tasks = [asyncio.create_task(login()) for _ in range(3)]
                await asyncio.sleep(0)
                if settle:
                    deadline = asyncio.get_running_loop().time() + 10
                    while True:  # until all three hold the pair: one more is refused
                        try:
                            await throttle.check("ada", "10.0.0.1")
                        except LoginThrottled:
                            break
                        assert asyncio.get_running_loop().time() < deadline
                        await asyncio.sleep(0.01)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await throttle.check("ada", "10.0.0.1")
                assert not throttle._pending, throttle._pending

    asyncio.run(main())


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "workers-table"])
def test_failures_of_a_pair_are_forgotten_a_lockout_window_after_the_last(tmp_path: Path, shared: bool) -> None:
    """A failure count used to live for ever: a user's typo a month ago still counted toward a lockout."""
    from bastion.security.ratelimit_shared import SharedTable

    async def main() -> None:
        clock = Clock()
        table = SharedTable.create(64) if shared else None
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=3, lockout=60, clock=clock, shared=table)
            assert not await throttle.failed("ada", "10.0.0.1")
            clock.now += 59  # still in the window: it counts, and the window starts again from here
            assert not await throttle.failed("ada", "10.0.0.1")
            clock.now += 60  # a window after the last: forgotten
            assert not await throttle.failed("ada", "10.0.0.1")
            assert not await throttle.failed("ada", "10.0.0.1")
            assert await throttle.failed("ada", "10.0.0.1")  # three in a window: locked
        if table is not None:
            table.close()

    asyncio.run(main())


def test_closing_waits_for_the_lockout_writes_of_cancelled_logins(tmp_path: Path) -> None:
    """``aclose`` used to leave a cancelled login's lockout write running: the store closed under it (or the loop
    cancelled it), and after the restart the pair was not locked."""

    async def main() -> None:
        clock = Clock()
        async with open_store(tmp_path / "s.db") as store:
            throttle = LoginThrottle(store, max_failures=1, lockout=300, clock=clock)
            writing = asyncio.Event()
            real = store.set_lockout

            async def slow_set_lockout(key: str, until: float) -> None:
                writing.set()
                await asyncio.sleep(0.3)  # a slow store write
                await real(key, until)

            store.set_lockout = slow_set_lockout  # type: ignore[method-assign]
            login = asyncio.create_task(throttle.failed("ada", "10.0.0.1"))  # locks the pair
            await writing.wait()
            login.cancel()  # the client drops
            await asyncio.gather(login, return_exceptions=True)
            await throttle.aclose()  # the server stops; then the store closes
            assert not throttle._writing
        async with open_store(tmp_path / "s.db") as store:  # the restart
            until = await store.get_lockout("login:ada|10.0.0.1")
            assert until is not None and until > clock.now, "the lockout was lost at shutdown"

    asyncio.run(main())
