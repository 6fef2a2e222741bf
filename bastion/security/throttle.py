"""Brute-force throttling of failed authentication.

Three limits, so an attacker can neither guess fast nor lock a user out
from everywhere:

* per source address: a token bucket of failures (``burst`` at once, then
  ``rate`` per second) -- bounds the guessing speed of one machine, while
  a well-behaved client that reconnects often spends nothing. An IPv6
  source is its ``/ipv6_prefix`` network (64: one host usually owns a whole
  /64, as the rate limiter assumes), so hopping addresses gains nothing;
* per (username, source): after ``max_failures`` failures in a row the pair is
  locked for ``lockout`` seconds (durable: kept in the credential store) --
  the user can still log in from anywhere else;
* per username, globally: a slow bucket (``global_per_hour``) -- bounds a
  distributed attack on one account. It does not bind a source the user
  has logged in from in the last ``known_for`` seconds (30 days): else an
  attacker spending the allowance from two addresses, each under its own
  lockout, would keep the user out from everywhere for as long as they
  liked. Such a known source still has its (username, source) lockout.

Theory of operation: ``attempt`` (a context) runs before any password is
verified and raises ResourceExhausted with a retry-after when a limit is hit
(cheap, so a throttled attacker costs no argon2 work); ``failed``/``succeeded``
record the outcome inside it. Until the block ends the attempt counts as
pending against the limits on guessing one account -- the (username, source)
pair and the username's allowance -- so guesses sent at once cannot all pass
before the first failure is counted. The per-source bucket counts failures,
and a password attempt also counts the attempts pending from its source:
while a token is left, attempts sent at once over many user names would
otherwise all be verified before the first failure was charged. Those that
succeed spend nothing; one past the bucket only because of others pending is
refused "at once" with a retry-after of a second, and the token handshake's
``check(None, host)`` tests failures alone, so logins in flight never refuse
it. ``check`` is the same test without holding anything. The pending counts
are released in a ``finally``, so a cancelled login (a dropped connection, a
deadline) leaves none behind. The clock is injected; nothing here sleeps.

Several workers (``bastion serve --workers N``): pass ``shared``, the
workers' ``SharedTable`` (ratelimit_shared.py), and the per-source and
per-user buckets and the failure counts live there, and ``pending``, a
``SharedPending`` (throttle_shared.py), and the attempts pending are counted
across the workers too -- tested and taken under its table's lock, so
guesses the kernel spreads over the workers get one round, not one per
worker; those of a worker killed in the middle of a login stop counting once
it is reaped. So the limits hold across the workers as they do in one
process. A worker with ``MAX_IN_FLIGHT`` password attempts in flight refuses
the next "too many logins in flight" (a retry-after of a second), which
bounds that table: it fails closed, never forgetting an attempt in flight.
In one process the pending counts are a ``Counter`` (no lock, no table, no
such bound). Lockouts are in the store anyway, and so are the known sources
(rows of the lockouts table keyed ``known:USER|SOURCE`` whose ``until`` is
the end of the remembering).

Replicas (servers on one PostgreSQL store): the lockouts and the known
sources are in the store. Without Redis the buckets, the failure counts and
the pending counts are each server's own (memory, or its workers' tables),
so each replica allows a source its ``burst``, a username its
``global_per_hour`` and a pair ``max_failures - 1`` failures before the one
that writes the lockout every replica honours: guesses spread over K
replicas get about K times as many. With ``redis_url`` (the configuration's
``rate_limits.redis_url``) they all live in Redis instead
(``RedisLoginLimits``, throttle_redis.py): each test-and-hold and each
failure is one atomic Lua script, so the replicas share one budget, and a
hold expires after ``HOLD_SECONDS`` should its replica die (while its login
is in flight, however long, the replica keeps refreshing it). While Redis
fails, ``redis_fail_open`` (``auth.redis_fail_open``, true by default) falls
back to this server's own limits -- today's per-replica guarantee, the
lockouts still shared -- and false refuses password attempts UNAVAILABLE
(token handshakes always fall back: there is nothing to guess). The default
is the fallback because refusing would turn a Redis outage, which an
attacker may be able to cause, into an outage of every password login.
The fallback's counts add to Redis's: what Redis counted stands, and each
replica counts on its own while Redis fails, so around an outage guesses get
up to K + 1 times the allowances. A success while Redis fails forgives the
pair here at once and in Redis once it answers again (``RedisLoginLimits``).
A ``FAILED`` that decides a lockout also locks the pair in Redis, so every
replica asking Redis refuses it at once, before the store has the lockout.
A ``FAILED`` whose answer is lost (it may have run: counted, the lockout
decided) is counted here too meanwhile, and run again -- it is idempotent,
keyed by a failure id, so Redis counts it once -- until Redis answers; a
lockout it decided is written then (before the pair's next password attempt
here is tested in Redis), so a lost answer never yields a guess counted
nowhere, nor a lockout lost. A lockout's write runs in a task of its own: a
login cancelled meanwhile does not cancel it, and ``aclose`` waits for it.

Failure counts of a pair are forgotten ``lockout`` seconds after the pair's
last failure, in every backend (memory, the workers' table, Redis): failures
"in a row" are those no further apart than a lockout.

An admin lifts a user's lockouts from every source with ``unlock``
(``auth.unlock_user``; ``auth.set_password`` too): the store's rows, the
counts here and the user's keys in Redis (throttle_redis_unlock.py).

Lockouts are rows in the store, one per locked (username, source) pair.
Each new lockout also deletes up to ``LOCKOUT_PURGE_BATCH`` expired ones,
so a spray of usernames cannot grow the table without bound: it holds the
live lockouts plus at most what the purges have not reached yet, and each
write does a bounded amount of work (by the index on ``until``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol

from bastion.exceptions import ResourceExhausted, Unavailable, UsageError
from bastion.security.credentials import CredentialStore
from bastion.security.throttle_redis import RedisDown, RedisLoginLimits
from bastion.security.throttle_redis_unlock import unlock_redis

if TYPE_CHECKING:
    from bastion.security.ratelimit_shared import SharedCounts, SharedTable
    from bastion.security.throttle_shared import SharedPending

__all__ = ["LoginThrottle", "LoginThrottled", "TokenBucket", "source_key"]

log = logging.getLogger("bastion.throttle")

MAX_TRACKED = 100_000  # keys remembered in memory; the oldest are forgotten first
#: Expired lockouts deleted from the store with each new lockout (bounded work per write).
LOCKOUT_PURGE_BATCH = 100
#: The longest ``aclose`` takes in all (seconds): waiting for the lockout writes still running, then Redis's
#: settling and writes. Below the supervisor's ``KILL_MARGIN`` (5 s, supervisor.py), which is all a worker
#: whose drain used the whole grace has left once its components are closed.
CLOSE_TIMEOUT = 3.0
#: How long a source a user logged in from escapes the per-user global allowance (seconds).
KNOWN_SOURCE_SECONDS = 30 * 24 * 3600.0
_AT_ONCE = "too many attempts at once from this address; try again in a second"
_AT_ONCE_USER = "too many attempts at once for this user; try again in a second"
_LOCKED = "too many failed attempts; try again later"
_BUSY = "too many logins in flight on this server; try again in a second"


class LoginThrottled(ResourceExhausted):
    """An attempt the login throttle refused (RESOURCE_EXHAUSTED on the wire, like any other): its own class
    so the server counts it as bastion_auth_failures_total{reason="throttled"} wherever it is raised."""


def source_key(source: str, ipv6_prefix: int = 64) -> str:
    """The key limits per source use: an IPv4 address as is (IPv4-mapped IPv6 too), an IPv6 one's network."""
    if ":" not in source:
        return source
    try:
        address = ipaddress.IPv6Address(source)
    except ValueError:
        return source
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    shift = 128 - ipv6_prefix
    return f"{ipaddress.IPv6Address(int(address) >> shift << shift)}/{ipv6_prefix}"


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.tokens = capacity
        self.stamp = now

    def wait(self, now: float, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens will be there (0: now); takes nothing.

        A clock stepping back (the throttle's is the wall clock) refills nothing and
        takes nothing: else the bucket would owe the whole step, refusing until the
        clock had caught up again.
        """
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return 0.0 if self.tokens >= n else (n - self.tokens) / self.rate

    def take(self, now: float, n: float = 1.0) -> float:
        """0 if taken, else the seconds until ``n`` tokens will be there."""
        wait = self.wait(now, n)
        if not wait:
            self.tokens -= n
        return wait


class _Buckets:
    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity, self.rate = capacity, rate
        self._items: OrderedDict[str, TokenBucket] = OrderedDict()

    def wait(self, key: str, now: float, n: float = 1.0) -> float:
        bucket = self._items.get(key)
        return (
            (0.0 if n <= self.capacity else (n - self.capacity) / self.rate) if bucket is None else bucket.wait(now, n)
        )

    def take(self, key: str, now: float) -> float:
        bucket = self._items.get(key)
        if bucket is None:
            bucket = self._items[key] = TokenBucket(self.capacity, self.rate, now)
            if len(self._items) > MAX_TRACKED:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return bucket.take(now)

    def pop(self, key: str) -> None:
        self._items.pop(key, None)


class _Counts:
    """Counters per key, the oldest forgotten first past MAX_TRACKED; a count is forgotten ``ttl`` seconds
    after it last grew."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def add(self, key: str, now: float) -> int:
        count, stamp = self._items.pop(key, (0, now))
        count = 1 if now - stamp >= self.ttl else count + 1
        self._items[key] = (count, now)
        if len(self._items) > MAX_TRACKED:
            self._items.popitem(last=False)
        return count

    def get(self, key: str, now: float) -> int:
        count, stamp = self._items.get(key, (0, now))
        return 0 if now - stamp >= self.ttl else count

    def pop(self, key: str) -> None:
        self._items.pop(key, None)

    def keys_from(self, prefix: str) -> list[str]:
        """The keys counted that start with ``prefix`` (a walk over them all: for an admin's unlock)."""
        return [key for key in self._items if key.startswith(prefix)]


class _BucketMap(Protocol):
    def wait(self, key: str, now: float, n: float = 1.0) -> float: ...
    def take(self, key: str, now: float) -> float: ...
    def pop(self, key: str) -> None: ...


class _CountMap(Protocol):
    def add(self, key: str, now: float) -> int: ...
    def get(self, key: str, now: float) -> int: ...
    def pop(self, key: str) -> None: ...


class LoginThrottle:
    def __init__(
        self,
        store: CredentialStore,
        *,
        burst: int = 10,
        rate: float = 5.0,
        max_failures: int = 5,
        lockout: float = 300.0,
        global_per_hour: int = 100,
        clock: Callable[[], float] = time.time,
        shared: SharedTable | None = None,
        pending: SharedPending | None = None,
        ipv6_prefix: int = 64,
        redis_url: str | None = None,
        redis_prefix: str = "bastion:rl:",
        redis_timeout: float = 0.25,
        redis_fail_open: bool = True,
        redis_time: bool = True,
    ) -> None:
        """``redis_url``: keep the buckets, failure counts and attempts pending in Redis, shared by replicas
        (throttle_redis.py); ``redis_fail_open``: while it fails, throttle with this server's own (True) or
        refuse password attempts UNAVAILABLE (False); ``redis_time``: the scripts use Redis's clock (False:
        ``clock``, for tests)."""
        if min(burst, max_failures, global_per_hour) < 1 or not 0 < rate < math.inf or not lockout > 0:
            raise UsageError(
                "LoginThrottle: burst, max_failures and global_per_hour must be at least 1, "
                "rate and lockout positive (a bucket of 0 could never be paid)"
            )
        if not 1 <= ipv6_prefix <= 128:
            raise UsageError(f"LoginThrottle: ipv6_prefix must be 1..128, got {ipv6_prefix!r}")
        self.ipv6_prefix = ipv6_prefix
        self._store = store
        self._clock = clock
        self._sources: _BucketMap
        self._users: _BucketMap
        self._failures: _CountMap
        self._generations: SharedCounts | None = None  # with workers: the failure counts, renewed per user
        if shared is None:
            self._sources = _Buckets(burst, rate)
            self._users = _Buckets(global_per_hour, global_per_hour / 3600)
            self._failures = _Counts(lockout)
        else:
            from bastion.security.ratelimit_shared import SharedBuckets, SharedCounts

            self._sources = SharedBuckets(shared, "login-source", burst, rate)
            self._users = SharedBuckets(shared, "login-user", global_per_hour, global_per_hour / 3600)
            self._failures = self._generations = SharedCounts(shared, "login-failures", lockout)
        self.max_failures = max_failures
        self.lockout = lockout
        self._pending: Counter[str] = Counter()  # attempts inside ``attempt`` blocks, per limit key
        self._local_pending = self._pending.__getitem__  # (0 for a key not there; adds nothing)
        self._shared_pending = pending  # several workers: theirs, in place of ``_pending``
        self._redis: RedisLoginLimits | None = None
        self._writing: set[asyncio.Task[None]] = set()  # lockouts being written (kept referenced)
        self.redis_fail_open = redis_fail_open
        if redis_url is not None:
            self._redis = RedisLoginLimits.from_url(
                redis_url,
                timeout=redis_timeout,
                prefix=redis_prefix,
                burst=burst,
                rate=rate,
                max_failures=max_failures,
                user_capacity=global_per_hour,
                user_rate=global_per_hour / 3600,
                failure_seconds=lockout,
                fail_open=redis_fail_open,
                clock=None if redis_time else clock,
            )
            self._redis.on_lock = self._lock

    async def aclose(self) -> None:
        """Wait for the lockout writes still running (those of cancelled logins too), then close the
        connections to Redis, if any (which writes the lockouts of the failures whose answers were lost
        first): ``CLOSE_TIMEOUT`` seconds at most in all. Call it before the store closes."""
        deadline = time.monotonic() + CLOSE_TIMEOUT
        if self._writing:
            await asyncio.wait(set(self._writing), timeout=CLOSE_TIMEOUT)
            if self._writing:
                log.error("login throttle: closing with %d lockout write(s) unfinished", len(self._writing))
        if self._redis is not None:
            await self._redis.aclose(budget=max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _pair(username: str, source: str) -> str:
        return f"login:{username}|{source}"

    def _counted(self, username: str, source: str) -> str:
        """The key of the pair's failure count: with workers, with the user's generation (``unlock``)."""
        pair = self._pair(username, source)
        return pair if self._generations is None else pair + self._generations.generation(username)

    @staticmethod
    def _known(username: str, source: str) -> str:
        return f"known:{username}|{source}"

    async def check(self, username: str | None, source: str) -> None:
        """Raise LoginThrottled (a ResourceExhausted) if this attempt must not even be tried. Holds nothing;
        with no username (a token handshake) only the source's bucket of failures is tested."""
        source = source_key(source, self.ipv6_prefix)
        now = self._clock()
        if self._redis is not None:
            remote = await self._remote(username, source, password=username is not None, hold=False)
            if remote is not None:
                await self._refuse(username, source, now, remote[0])
                return
        shared = self._shared_pending
        if shared is None or username is None:
            limits = self._limits(username, source, now, self._local_pending, password=username is not None)
        else:
            with shared.table.locked():
                limits = self._limits(username, source, now, shared.counter(), password=True)
        await self._refuse(username, source, now, limits)

    @contextlib.asynccontextmanager
    async def attempt(self, username: str | None, source: str) -> AsyncIterator[None]:
        """A password attempt: ``check``, then hold it as pending until the block ends. The (username,
        source) pair and the username's allowance count the attempts pending as spent, so guesses sent at
        once are refused once they could exceed them; so does the source's bucket of failures (those that
        succeed give theirs back; a token handshake is not refused for them). ``username`` None (a name no
        user can have) is held against a pair of its own per source, so such guesses are bounded too."""
        source = source_key(source, self.ipv6_prefix)
        pair = "p:" + (username or "") + "|" + source
        keys = [pair, "s:" + source] if username is None else [pair, "s:" + source, "u:" + username]
        now = self._clock()
        if self._redis is not None:  # tested and held in one script: atomic across the replicas
            remote = await self._remote(username, source, password=True, hold=True)
            if remote is not None:
                try:
                    await self._refuse(username, source, now, remote[0])
                    yield
                finally:
                    await self._redis.release(username, source, remote[1])
                return
        # Tested and reserved before the first await (with workers, under the lock of their table of
        # attempts in flight): no concurrent attempt sees it unreserved.
        shared = self._shared_pending
        if shared is None:
            limits = self._limits(username, source, now, self._local_pending, password=True)
            self._pending.update(keys)
        else:
            with shared.table.locked():
                limits = self._limits(username, source, now, shared.counter(), password=True)
                if not shared.hold(keys):  # this worker's limit, or no room: refused, never let through
                    raise LoginThrottled(_BUSY, retry_after=1.0)
        try:
            await self._refuse(username, source, now, limits)
            yield
        finally:
            if shared is None:
                self._pending.subtract(keys)
                for key in keys:
                    if self._pending[key] <= 0:
                        del self._pending[key]
            else:
                shared.release(keys)

    async def _remote(
        self, username: str | None, source: str, *, password: bool, hold: bool
    ) -> tuple[tuple[float, bool], str] | None:
        """The limits tested in Redis (``hold``: and the attempt held there): what ``_limits`` answers, and
        the hold id; None if Redis is down and this server's own limits apply (``redis_fail_open``, or no
        password), else UNAVAILABLE."""
        assert self._redis is not None
        try:
            (code, wait, at_once), hold_id = await self._redis.limits(username, source, password=password, hold=hold)
        except RedisDown:
            if password and not self.redis_fail_open:
                raise Unavailable("the login throttle is unavailable; try again in a second", retry_after=1.0) from None
            return None
        if code == 1:
            raise LoginThrottled(_AT_ONCE, retry_after=min(wait, 1.0))
        if code == 2:
            raise LoginThrottled("too many failed attempts from this address", retry_after=wait)
        if code == 3:
            raise LoginThrottled(_AT_ONCE, retry_after=1.0)
        if code == 4:  # (locked in Redis: every replica refuses it before the store has the lockout)
            raise LoginThrottled(_LOCKED, retry_after=wait)
        return (wait, at_once), hold_id

    async def _refuse(self, username: str | None, source: str, now: float, limits: tuple[float, bool]) -> None:
        """Raise for the per-user allowance (unless the source is known for the user) or a lockout."""
        if username is None:
            return
        user_wait, at_once = limits
        if user_wait:
            known = await self._store.get_lockout(self._known(username, source))
            if known is None or known <= now:
                if at_once:
                    raise LoginThrottled(_AT_ONCE_USER, retry_after=min(user_wait, 1.0))
                raise LoginThrottled("too many failed attempts for this user; try again later", retry_after=user_wait)
        until = await self._store.get_lockout(self._pair(username, source))
        if until is not None and until > now:
            raise LoginThrottled(_LOCKED, retry_after=until - now)

    def _limits(
        self, username: str | None, source: str, now: float, pending: Callable[[str], int], *, password: bool
    ) -> tuple[float, bool]:
        """Raise for the source's bucket (failures; a password attempt's pending ones too) or the pair's (a
        ``password`` attempt's); the wait the per-user allowance asks (which a known source escapes), 0 if
        none, and whether only attempts pending make it wait. ``pending``: the attempts pending per key."""
        # A password attempt counts the attempts pending from its source as spent: else, while a token is
        # left, any number sent at once (a spray over many user names) would all be verified before the
        # first failure was charged. Those that succeed give theirs back. A token handshake tests failures.
        here = pending("s:" + source) if password else 0
        wait = self._sources.wait(source, now, 1 + here)
        if wait:
            if here and not self._sources.wait(source, now):
                raise LoginThrottled(_AT_ONCE, retry_after=min(wait, 1.0))
            raise LoginThrottled("too many failed attempts from this address", retry_after=wait)
        if not password:
            return 0.0, False
        failures = 0 if username is None else self._failures.get(self._counted(username, source), now)
        # Failures alone never reach it: they lock and reset.
        if failures + pending("p:" + (username or "") + "|" + source) >= self.max_failures:
            raise LoginThrottled(_AT_ONCE, retry_after=1.0)
        if username is None:
            return 0.0, False
        in_flight = pending("u:" + username)
        wait = self._users.wait(username, now, 1 + in_flight)
        return wait, bool(wait and in_flight and not self._users.wait(username, now))

    async def failed(self, username: str | None, source: str) -> bool:
        """Record a failure; True if it locked the (username, source) pair."""
        source = source_key(source, self.ipv6_prefix)
        now = self._clock()
        lock = None
        if self._redis is not None:
            with contextlib.suppress(RedisDown):  # else counted here: the best there is meanwhile
                lock = await self._redis.failed(username, source)
        if lock is None:
            lock = self._count_failure(username, source, now)
        if lock and username is not None:
            # In a task of its own: a login cancelled meanwhile (a client dropping) still writes the lockout
            # (the count that decided it is gone).
            task = asyncio.get_running_loop().create_task(self._lock(username, source))
            self._writing.add(task)
            task.add_done_callback(self._written)
            await asyncio.shield(task)
            return True
        return False

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("login throttle: writing a lockout failed", exc_info=exc)

    async def _lock(self, username: str, source: str) -> None:
        """Lock the pair for ``lockout`` seconds from now (``source``: its key); purge a batch of expired."""
        now = self._clock()
        await self._store.set_lockout(self._pair(username, source), now + self.lockout)
        await self._store.expire_lockouts(now, LOCKOUT_PURGE_BATCH)

    def _count_failure(self, username: str | None, source: str, now: float) -> bool:
        """Record a failure in this server's own limits; True if the pair is to be locked now."""
        self._sources.take(source, now)
        if username is None:
            return False
        self._users.take(username, now)  # spend from the slow global allowance
        key = self._counted(username, source)
        if self._failures.add(key, now) >= self.max_failures:
            self._failures.pop(key)
            return True
        return False

    async def unlock(self, username: str, *, refill: bool = True) -> int:
        """Lift ``username``'s lockouts from every source and forget their failures, and (``refill``) their
        allowance's spending -- not for ``auth.unlock_user``: the password stays the same, and a distributed
        guessing campaign that spent the allowance would get a fresh one; an admin's ``auth.set_password`` and
        ``auth.delete_user`` refill it: in the store, in Redis if
        configured, and here (with workers, in their shared table: a new generation of the user's counts
        forgets them all). The known sources stay. How many (username, source) pairs were locked. Should Redis
        fail, the rest is done and Unavailable raised: calling again finishes it."""
        now = self._clock()
        rows = await self._store.delete_lockouts(username)
        locked = {source for source, until in rows.items() if until > now}
        sources = set(rows)
        down = False
        if self._redis is not None:
            try:
                in_redis, counted = await unlock_redis(self._redis, username, refill=refill)
            except RedisDown:
                down = True
            else:
                locked |= in_redis
                sources |= counted
        if self._generations is not None:  # every count of the user's, whatever the sources the store names
            self._generations.renew(username)
        else:
            pair = self._pair(username, "")
            keys = {pair + source for source in sources}
            if isinstance(self._failures, _Counts):
                keys.update(self._failures.keys_from(pair))
            for key in keys:
                self._failures.pop(key)
        if refill:
            self._users.pop(username)
        if down:
            raise Unavailable("lockouts lifted in the store, but Redis failed: try again", retry_after=1.0)
        return len(locked)

    async def succeeded(self, username: str, source: str) -> None:
        """Record a success: the pair's failures are forgiven and the source is known for the user."""
        source = source_key(source, self.ipv6_prefix)
        self._failures.pop(self._counted(username, source))  # (counted here while Redis was down, perhaps)
        if self._redis is not None:  # (Redis failing: forgiven there once it answers again)
            await self._redis.succeeded(username, source)
        await self._store.set_lockout(self._known(username, source), self._clock() + KNOWN_SOURCE_SECONDS)
