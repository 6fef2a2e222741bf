"""The login throttle's counts in Redis, so that replicas share one budget of guesses.

Theory of operation
-------------------

``LoginThrottle`` (throttle.py) keeps, besides the lockouts in the store,
token buckets of failures per source and per username, the failures in a
row of each (username, source) pair and the attempts pending (being
verified). In memory, or in a worker table, they are each server's own:
guesses spread over K replicas got about K times every allowance. When
``rate_limits.redis_url`` is set, ``RedisLoginLimits`` keeps them in Redis
instead, and every test and change is one Lua script (EVALSHA, loaded on
NOSCRIPT), atomic, so replicas testing at once cannot both pass on the last
place:

* ``LIMITS`` tests the source's bucket (with the attempts pending from it),
  the pair's lockout in Redis, its failures and pending attempts, and the
  username's allowance,
  exactly as ``LoginThrottle._limits`` does, and -- for an ``attempt`` --
  holds the attempt as pending under the pair, the source and the username
  in the same step;
* ``FAILED`` spends from the source's and the username's buckets and counts
  the pair's failure; at ``max_failures`` it deletes the count, locks the
  pair in Redis for a lockout (``LIMITS`` refuses it at once on every
  replica) and answers that the pair is to be locked (the throttle writes
  the lockout to the store, as ever: it outlives Redis and binds servers
  that cannot reach it); the end of the block releases the holds (ZREM). Each failure
  has an id, and the script keeps its answer under it: run again, it answers
  that and counts nothing. So a failure whose answer was lost (a timeout, a
  reset, a cancelled login) is run again until Redis answers (``_settling``),
  and a lockout it decided is written then (``on_lock``; the failure is
  forgotten only once it is written, in a task a cancelled login does not
  cancel); the pair's next password attempt here runs it first (``limits``;
  while Redis fails, that attempt is skipped or is the probe).

Keys: ``<rate_limits.redis_prefix>{login}:<kind>:<name>``: ``s:SOURCE`` and
``u:USER`` (buckets: hashes {t, s} as the rate limiter's), ``f:USER|SOURCE``
(failures: a counter), ``l:USER|SOURCE`` (a lockout: when it ends),
``d:FAILURE_ID`` (a password failure's answer, 0 or 1), ``ps:``/``pp:``/
``pu:`` (pending: sorted sets of hold ids scored by when they expire).
The one hash tag puts them all on one
Redis Cluster slot (a script's keys must share one). Every key expires: a
bucket once it would be full again, a failure count ``lockout`` seconds after
the pair's last failure (as in memory), a lockout when it ends, a failure's answer ``lockout`` seconds
after it, and a hold ``HOLD_SECONDS`` after it
was taken or last refreshed -- so the holds of a replica that died in the
middle of a login stop counting then, and nothing is left behind. While its
login is in flight a hold is refreshed (``REFRESH``, every ``HOLD_SECONDS /
3``, one script for all of a replica's holds): a login that waits longer
than ``HOLD_SECONDS`` for argon2 (queued under load, with no deadline) still
counts on every replica. (The alternative, a ``HOLD_SECONDS`` derived from
the longest a login can take, has nothing to derive from: no limit bounds
how long a call without a deadline waits for a hashing slot.) A hold whose answer never
came back (the login cancelled while waiting for it -- a client dropping --
or Redis's answer timing out after the script ran), or whose release failed,
is released by a background task (``_cleanup``, kept referenced): at once
if Redis is healthy, else when it answers again (``RedisGate``'s
``on_back``). Likewise a success while Redis fails forgives the pair here
at once and in Redis (DEL of its failure count) once it answers again.
At most ``MAX_UNRELEASED`` of each are remembered, the oldest left to
expire. Time is Redis's own (TIME)
unless a clock is given (tests), so the replicas' clocks need not agree.

Redis down (an error, or no answer within ``rate_limits.redis_timeout``):
the calls here raise ``RedisDown``, and the throttle falls back to its own
limits (``auth.redis_fail_open = true``, the default) or refuses password
attempts UNAVAILABLE (``false``); see throttle.py. A warning is logged at
most once a minute (a ``LogBudget``), and after a failure Redis is not asked
for ``RETRY_AFTER`` seconds, then by one attempt at a time, as the rate
limiter does: a hanging Redis costs one timeout a second, not one per login.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple, cast

from bastion.observability.loglimit import LogBudget, suppressed_note
from bastion.security.redis_gate import RETRY_AFTER, RedisGate, Skipped
from bastion.security.throttle_redis_scripts import FAILED, LIMITS, REFRESH

__all__ = ["HOLD_SECONDS", "RETRY_AFTER", "RedisDown", "RedisLoginLimits"]

log = logging.getLogger("bastion.throttle")

#: Seconds a hold lasts unless refreshed: a replica that dies (or loses Redis) holding one stops counting it
#: then. A live one is refreshed every ``HOLD_SECONDS / 3``, however long its login takes.
HOLD_SECONDS: Final = 30.0
_WARN_WINDOW: Final = 60.0
#: Holds to release, and pairs to forgive, once Redis answers again, at most of each (past it the oldest
#: are left to expire: a hold after HOLD_SECONDS, a failure count a lockout window after its last failure).
MAX_UNRELEASED: Final = 10_000
#: Commands per pipeline when they are sent at last.
_BATCH: Final = 500
_WRITE_TIMEOUT: Final = 5.0  # the longest ``aclose`` waits for the lockout writes still running, after settling

#: What ``LIMITS`` answers: (code, wait, at once) -- see ``RedisLoginLimits.limits``.
Answer = tuple[int, float, bool]


class _Failure(NamedTuple):
    """A failure whose ``FAILED`` answer was lost: what to run again, and when it was first sent."""

    username: str | None
    source: str
    keys: list[str]
    args: list[str]
    since: float  # time.monotonic()


class RedisDown(Exception):
    """Redis failed (or was not asked: it failed moments ago). Logged already."""


class RedisLoginLimits:
    """The login throttle's buckets, failure counts and pending attempts in Redis; see the module docstring."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        burst: float,
        rate: float,
        max_failures: int,
        user_capacity: float,
        user_rate: float,
        failure_seconds: float,
        fail_open: bool = True,
        clock: Callable[[], float] | None = None,
        owns_client: bool = False,
        close_timeout: float = 1.0,
    ) -> None:
        """``fail_open``: what the throttle does while Redis fails (said in the warning); ``clock``: None for
        Redis's own time (TIME), else the one the scripts are given (tests); ``close_timeout``: the longest
        ``aclose`` settles the failures whose answers were lost."""
        from bastion.security.ratelimit_redis import redis_module  # (it imports throttle.py)

        redis = redis_module()
        self._client = client
        self._owns_client = owns_client
        self.close_timeout = close_timeout
        self.prefix = prefix + "{login}:"
        self._limit_args = [repr(float(burst)), repr(float(rate)), str(max_failures)]
        self._user_args = [repr(float(user_capacity)), repr(float(user_rate))]
        self._failure_seconds = repr(float(failure_seconds))
        self._failure_window = float(failure_seconds)
        self._clock = clock
        self._meanwhile = (
            "throttling per replica meanwhile" if fail_open else "refusing password logins meanwhile"
        ) + " (auth.redis_fail_open)"
        self._holds = itertools.count()
        self._replica = secrets.token_hex(6)  # hold ids: unique across replicas
        self._warnings = LogBudget(1, _WARN_WINDOW)
        self._gate = RedisGate(client, redis, on_back=self._back)
        self._errors = self._gate.errors
        # Holds whose LIMITS ran (or may have) but were never released -- the answer was lost (a timeout,
        # a cancelled login) or the release failed: hold id -> its keys. Released by ``_cleanup``, a
        # task kept here (never lost half done), now if Redis is healthy, else once it answers again.
        self._unreleased: dict[str, list[str]] = {}
        self._unforgiven: dict[str, None] = {}  # failure counts of pairs that logged in while Redis failed
        self._cleaner: asyncio.Task[None] | None = None
        # Holds of attempts in flight here (hold id -> its keys), refreshed every ``refresh_every`` s by ``_refresh``,
        # a task running while there are any: a login that waits long for argon2 keeps counting on every replica.
        self._live: dict[str, list[str]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self.refresh_every = HOLD_SECONDS / 3
        # Failures whose FAILED may have run but whose answer never came (a timeout, a reset, a cancelled
        # login): failure id -> what to run again. ``_settling`` runs them again (FAILED is idempotent)
        # until Redis answers; once it does, a pair's next password attempt here runs its own first.
        self._unsettled: dict[str, _Failure] = {}
        self._settler: asyncio.Task[None] | None = None
        # Lockouts being written (``_write_lock``): failure id -> the task writing its lockout.
        self._locking: dict[str, asyncio.Task[None]] = {}
        #: Writes the lockout of a pair a failure run again locks (username, source): the throttle's.
        self.on_lock: Callable[[str, str], Awaitable[None]] | None = None

    @classmethod
    def from_url(cls, url: str, *, timeout: float, **kw: Any) -> RedisLoginLimits:
        """Limits with their own connection pool to ``url`` (commands time out after ``timeout``)."""
        from bastion.security.ratelimit_redis import redis_module

        redis = redis_module()
        client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        kw.setdefault("close_timeout", timeout + 1.0)  # (an answer from Redis, a second for the store's writes)
        return cls(client, owns_client=True, **kw)

    def keys(self, username: str | None, source: str) -> list[str]:
        """The seven keys ``LIMITS`` takes (a username None keys a pair of its own per source)."""
        user, p = username or "", self.prefix
        return [
            f"{p}s:{source}",
            f"{p}f:{user}|{source}",
            f"{p}u:{user}",
            f"{p}ps:{source}",
            f"{p}pp:{user}|{source}",
            f"{p}pu:{user}",
            f"{p}l:{user}|{source}",
        ]

    def _now(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    async def limits(self, username: str | None, source: str, *, password: bool, hold: bool) -> tuple[Answer, str]:
        """Test the limits (``hold``: and hold the attempt as pending if they pass); the answer, the hold id.

        The answer: (0, the wait the username's allowance asks, whether only attempts pending make it
        wait); (1, wait): the source's bucket, only because of attempts pending; (2, wait): its failures;
        (3, wait): the pair's failures and attempts pending reach ``max_failures``; (4, wait): the pair is
        locked (``FAILED`` decided it; the lockout in the store may not be written yet). Raises RedisDown.
        """
        hold_id = f"{self._replica}:{next(self._holds)}" if hold else ""
        mode = 2 if hold else 1 if password else 0
        args = [self._now(), str(mode), "0" if username is None else "1", *self._limit_args, *self._user_args]
        args += (hold_id, repr(HOLD_SECONDS))
        keys = self.keys(username, source)
        try:
            if password and username is not None and self._unsettled:  # (Redis failing: skipped or the probe)
                await self._settle(keys[1])  # a failure of the pair whose answer was lost first: it may lock
            result = await self._gate.run(LIMITS, keys, args)
        except BaseException as exc:  # (a cancelled login too) Redis may have run it, holding the attempt
            if hold and not isinstance(exc, Skipped):  # (skipped: never sent)
                self._unrelease(hold_id, keys[3 : 6 if username is not None else 5])
            if isinstance(exc, self._errors):
                self._failed(exc)
                raise RedisDown(str(exc)) from None
            raise
        code = int(result[0])
        if hold and code == 0:
            self._live[hold_id] = keys[3 : 6 if username is not None else 5]
            if self._refresher is None or self._refresher.done():
                self._refresher = asyncio.get_running_loop().create_task(self._refresh())
        return (code, float(_text(result[1])), code == 0 and int(result[2]) == 1), hold_id

    async def release(self, username: str | None, source: str, hold_id: str) -> None:
        """Count off an attempt ``limits`` held (should Redis fail, once it answers again; at the latest the
        hold stops counting after HOLD_SECONDS)."""
        keys = self.keys(username, source)[3 : 6 if username is not None else 5]
        self._live.pop(hold_id, None)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zrem(key, hold_id)
                await self._gate.ask(pipe.execute())
        except BaseException as exc:
            self._unrelease(hold_id, keys)
            if not isinstance(exc, self._errors):
                raise
            self._failed(exc)

    def _unrelease(self, hold_id: str, keys: list[str]) -> None:
        """Remember a hold to release when Redis answers (now, if it is healthy): bounded, oldest dropped."""
        self._unreleased[hold_id] = keys
        if len(self._unreleased) > MAX_UNRELEASED:
            del self._unreleased[next(iter(self._unreleased))]  # (it expires after HOLD_SECONDS anyway)
        if self._gate.healthy:
            self._clean_up()

    async def _refresh(self) -> None:
        """Every ``refresh_every`` seconds while attempts are in flight here, push back their holds' expiry
        (HOLD_SECONDS from now), a batch per script; should Redis fail, until the next round."""
        while self._live:
            await asyncio.sleep(self.refresh_every)
            live = list(self._live.items())
            for start in range(0, len(live), _BATCH):
                keys: list[str] = []
                ids: list[str] = []
                for hold_id, hold_keys in live[start : start + _BATCH]:
                    keys += hold_keys
                    ids += [hold_id] * len(hold_keys)
                try:
                    await self._gate.run(REFRESH, keys, [self._now(), repr(HOLD_SECONDS), *ids])
                except self._errors as exc:
                    self._failed(exc)
                    break

    def _forgive_later(self, key: str) -> None:
        """Remember a pair's failure count to delete when Redis answers: bounded, oldest dropped."""
        self._unforgiven[key] = None
        if len(self._unforgiven) > MAX_UNRELEASED:
            del self._unforgiven[next(iter(self._unforgiven))]
        if self._gate.healthy:
            self._clean_up()

    def _clean_up(self) -> None:
        """Start ``_cleanup`` unless it is running (it takes whatever was added meanwhile too)."""
        if self._cleaner is None or self._cleaner.done():
            with contextlib.suppress(RuntimeError):  # (no event loop running: closing; they expire)
                self._cleaner = asyncio.get_running_loop().create_task(self._cleanup())

    async def _cleanup(self) -> None:
        """Release the holds left behind and delete the failure counts of the pairs forgiven meanwhile, a
        batch per pipeline; those of a batch Redis fails are kept (for when it answers again)."""
        while self._unreleased or self._unforgiven:
            holds = dict(itertools.islice(self._unreleased.items(), _BATCH))
            pairs = list(itertools.islice(self._unforgiven, _BATCH))
            for hold_id in holds:
                del self._unreleased[hold_id]
            for key in pairs:
                del self._unforgiven[key]
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for hold_id, keys in holds.items():
                        for key in keys:
                            pipe.zrem(key, hold_id)
                    if pairs:
                        pipe.delete(*pairs)
                    await self._gate.ask(pipe.execute())
            except self._errors as exc:
                for hold_id, keys in holds.items():
                    self._unreleased.setdefault(hold_id, keys)
                for key in pairs:
                    self._unforgiven.setdefault(key, None)
                self._failed(exc)
                return

    async def failed(self, username: str | None, source: str) -> bool:
        """Record a failure; True if the pair is to be locked now (its count is gone). Raises RedisDown.

        Should the answer be lost (the script may have run: counted, the lockout decided), a password
        failure (``username`` given; a bad token's is not idempotent and decides nothing) is run again
        (under its id: counted once) until Redis answers, and a lockout it decides is written then
        (``on_lock``)."""
        failure_id = f"{self._replica}:{next(self._holds)}"
        every = self.keys(username, source)
        keys = [*every[:3], f"{self.prefix}d:{failure_id}", every[6]]
        args = [self._now(), "0" if username is None else "1", *self._limit_args, *self._user_args]
        args.append(self._failure_seconds)
        try:
            return int(await self._gate.run(FAILED, keys, args)) == 1
        except BaseException as exc:  # (a cancelled login too) Redis may have run it
            # (skipped: never sent; counted by the throttle alone. A bad token's is not run again: it is not
            # idempotent -- the script keeps no answer for it -- and decides no lockout.)
            if username is not None and not isinstance(exc, Skipped):
                self._unsettle(failure_id, _Failure(username, source, keys, args, time.monotonic()))
            if isinstance(exc, self._errors):
                self._failed(exc)
                raise RedisDown(str(exc)) from None
            raise

    def _unsettle(self, failure_id: str, failure: _Failure) -> None:
        """Remember a failure to run again until Redis answers it: bounded, oldest dropped."""
        self._unsettled[failure_id] = failure
        if len(self._unsettled) > MAX_UNRELEASED:
            del self._unsettled[next(iter(self._unsettled))]
        if self._settler is None or self._settler.done():
            with contextlib.suppress(RuntimeError):  # (no event loop running: closing)
                self._settler = asyncio.get_running_loop().create_task(self._settling())

    async def _settling(self) -> None:
        """Run the failures whose answers were lost again, every ``RETRY_AFTER / 2`` while Redis fails, until
        it has answered each (it is asked at once, then as ``RedisGate`` lets a request retry it)."""
        while self._unsettled:
            try:
                await self._settle(None)
            except self._errors as exc:
                if not isinstance(exc, Skipped):
                    self._failed(exc)
                await asyncio.sleep(RETRY_AFTER / 2)
            except Exception:  # (writing a lockout failed: the store) never lose the task half done
                if (left_out := self._warnings.take("settle")) is not None:  # (once a minute, as Redis failing)
                    log.exception("login throttle: settling a lost failure failed%s", suppressed_note(left_out))
                await asyncio.sleep(RETRY_AFTER / 2)

    async def _settle(self, pair: str | None) -> None:
        """Run again the failures whose answers were lost (those of ``pair``, its failure count's key, or
        all) and have the lockouts they decide written (``on_lock``). Raises what Redis raises (the
        failures it did not answer are kept). One older than a failure count lives is dropped: its answer
        may be gone from Redis (run again, it would count anew), and a lockout it decided would be over."""
        cutoff = time.monotonic() - self._failure_window
        for failure_id, failure in list(self._unsettled.items()):
            if failure.since < cutoff:
                self._unsettled.pop(failure_id, None)
                continue
            if pair is not None and failure.keys[1] != pair:
                continue
            lock = int(await self._gate.run(FAILED, failure.keys, failure.args)) == 1
            if failure_id not in self._unsettled:
                continue  # (settled meanwhile by another call: it wrote the lockout)
            if not lock or failure.username is None or self.on_lock is None:
                del self._unsettled[failure_id]
                continue
            await self._write_lock(failure_id, failure.username, failure.source)

    async def _write_lock(self, failure_id: str, username: str, source: str) -> None:
        """Have the lockout a failure run again decided written (``on_lock``), then forget the failure. In a
        task of its own (one already writing it is awaited), so a login cancelled meanwhile (a client
        dropping) does not cancel the write; should the write fail, the failure is kept (and raised here):
        run again, it answers the lockout again, and the write is tried again."""
        task = self._locking.get(failure_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._locked(failure_id, username, source))
            self._locking[failure_id] = task
            task.add_done_callback(functools.partial(self._written, failure_id))
        await asyncio.shield(task)

    async def _locked(self, failure_id: str, username: str, source: str) -> None:
        assert self.on_lock is not None
        await self.on_lock(username, source)
        self._unsettled.pop(failure_id, None)
        if (left_out := self._warnings.take("locked", 10)) is not None:  # (10 a minute)
            log.warning("login throttle: a lost failure locked its pair; lockout written%s", suppressed_note(left_out))

    def _written(self, failure_id: str, task: asyncio.Task[None]) -> None:
        self._locking.pop(failure_id, None)
        if not task.cancelled():
            task.exception()  # (retrieved: raised to whoever awaits it; the settler tries it again)

    async def succeeded(self, username: str, source: str) -> None:
        """Forgive the pair's failures: now, or -- should Redis fail -- once it answers again (else, once
        back, one typo within the lockout window could lock the pair)."""
        key = self.keys(username, source)[1]
        for failure_id, failure in list(self._unsettled.items()):  # forgiven too: never counted back after it
            if failure.keys[1] == key:
                del self._unsettled[failure_id]
        try:
            await self._gate.ask(self._client.delete(key))
        except BaseException as exc:
            self._forgive_later(key)
            if not isinstance(exc, self._errors):
                raise
            self._failed(exc)

    def _back(self) -> None:
        if self._warnings.take("redis-back") is not None:
            log.info("login throttle: Redis answering again")
        if self._unreleased or self._unforgiven:
            self._clean_up()

    def _failed(self, exc: BaseException) -> None:
        """Log that Redis is failing, at most once a minute (the others counted, and said in the next)."""
        left_out = self._warnings.take("redis")
        if left_out is not None:
            log.warning(
                "login throttle: Redis failing (%s: %s); %s%s",
                type(exc).__name__,
                exc,
                self._meanwhile,
                suppressed_note(left_out),
            )

    async def aclose(self, budget: float = _WRITE_TIMEOUT) -> None:
        """Close the client if these limits made it (``from_url``); holds left unreleased expire. The failures
        whose answers were lost are settled first, their lockouts written, for at most ``close_timeout`` seconds
        (then dropped: a restart would forget them), then the lockout writes still running: ``budget`` s in all."""
        deadline = time.monotonic() + budget
        for task in (self._cleaner, self._refresher, self._settler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._unsettled:
            try:
                await asyncio.wait_for(self._settle(None), min(self.close_timeout, budget))
            except Exception as exc:  # (Redis failing, the store, or out of time)
                log.warning(
                    "login throttle: closing with %d failure(s) whose answers were lost unsettled (%s: %s)",
                    len(self._unsettled),
                    type(exc).__name__,
                    exc,
                )
        writes, wait = set(self._locking.values()), deadline - time.monotonic()  # (past it: none waited for)
        if writes and (left := (await asyncio.wait(writes, timeout=wait))[1]):
            log.error("login throttle: closing with %d lockout write(s) unfinished", len(left))
        if self._owns_client:
            await cast(Any, self._client).aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
