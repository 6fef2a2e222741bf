"""Retry decisions both clients share: small pure classes, clock and randomness injectable.

Theory of operation. A call that fails with a retryable status (UNAVAILABLE,
RESOURCE_EXHAUSTED) is tried again only when it is known to be idempotent --
the caller said so, or the server's ``admin.methods`` listing does
(``IdempotentMethods``). The wait before the next attempt is exponential
backoff with full jitter, never shorter than the server's ``retry_after``;
no retry is made that could not finish before the call's deadline, nor when
the client's ``RetryBudget`` (a share of its recent requests plus a small
floor per second) is spent, so an overloaded server is not hit by a retry
storm. One failure is different: ``NotStarted`` -- the server's GoAway proves
the call never began -- which any call may replay once, at once, on a new
connection.

Nothing here does I/O or allocates on a call that succeeds: the clients count
the request (``RetryBudget.on_request``) and make an ``Attempts`` only when
an attempt has failed.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable, Iterable
from typing import Any

from bastion.exceptions import CallError, TransportError, Unavailable, UsageError
from bastion.status import RETRYABLE, Status

__all__ = [
    "DEFAULT_RETRY",
    "LISTING_METHOD",
    "LISTING_TIMEOUT",
    "Attempts",
    "IdempotentMethods",
    "NotStarted",
    "RetryBudget",
    "RetryPolicy",
    "is_replayable",
]

#: The method whose listing says which methods are idempotent.
LISTING_METHOD = "admin.methods"
#: The longest a client waits for that listing (less if the call's deadline is nearer).
LISTING_TIMEOUT = 2.0

Clock = Callable[[], float]
Random = Callable[[], float]


class NotStarted(Unavailable):
    """UNAVAILABLE: the server's GoAway proves this call never started, so it is safe to send again.

    Raised for a call whose id is above the GoAway's ``last_id``. Clients
    replay such a call once on a new connection, idempotent or not.
    """


class RetryBudget:
    """How many retries a client may make: a share of its requests plus a floor per second.

    A token bucket, as gRPC's retry throttling and Finagle's ``RetryBudget``:
    every request adds ``ratio`` of a token, time adds ``min_per_second``
    tokens a second, a retry takes one, and the bucket holds at most
    ``capacity`` (it starts full). So over any stretch of T seconds a client
    retries at most ``capacity + ratio * requests + min_per_second * T``
    times: when everything fails, retries add at most ``ratio`` to the load,
    yet a client that sends little can still retry a little.

    ``on_request`` is one counter increment (it runs on every call; the
    async client's usual call adds to ``requests`` itself, a method call
    fewer); the bucket is brought up to date only when a retry is considered.
    """

    __slots__ = ("_clock", "_tokens", "_updated", "capacity", "min_per_second", "ratio", "requests")

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 1.0,
        capacity: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not (ratio >= 0 and min_per_second >= 0):
            raise UsageError("RetryBudget: ratio and min_per_second must not be negative")
        if not capacity >= 1:
            raise UsageError("RetryBudget: capacity must be at least 1 (one retry)")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        #: Requests made since the bucket was last brought up to date.
        self.requests = 0
        self._updated = clock()

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"capacity={self.capacity}, balance={self.balance:.2f})"
        )

    def on_request(self) -> None:
        """A call was made (count it; retries are not calls)."""
        self.requests += 1

    def can_retry(self) -> bool:
        """Whether the budget has a retry left (it does not take it: see ``on_retry``)."""
        return self._refill() >= 1.0 - 1e-9  # ten deposits of 0.1 make a token

    def on_retry(self) -> None:
        """A retry was made: take its token."""
        self._tokens = self._refill() - 1.0

    @property
    def balance(self) -> float:
        """Tokens in the bucket now: the retries that may be made at once."""
        return self._refill()

    def _refill(self) -> float:
        now = self._clock()
        earned = self.ratio * self.requests + self.min_per_second * max(0.0, now - self._updated)
        self.requests = 0
        self._updated = now
        self._tokens = min(self.capacity, self._tokens + earned)
        return self._tokens


class RetryPolicy:
    """When and how soon a failed call is tried again.

    max_attempts: attempts in all, the first included (1 disables retries).
    base_delay, multiplier, max_delay: the backoff before attempt n+1 is
    uniform in ``[0, min(max_delay, base_delay * multiplier**(n-1))]`` ("full
    jitter"). retryable: the statuses worth another attempt. A server's
    ``retry_after`` is a floor on the wait; one longer than ``max_delay`` is
    not waited for here -- the error is raised for the caller to decide.
    No retry is started that the call's deadline would cut short.

    budget: a ``RetryBudget`` shared by every client given this policy; by
    default (None) each client makes its own (``new_budget``) with
    ``budget_ratio`` and ``budget_min_per_second``.
    random, clock: injectable sources (``random()`` in [0, 1), monotonic
    seconds), for tests.

    A policy holds no per-call or per-client state and may be shared.
    """

    __slots__ = (
        "base_delay",
        "budget",
        "budget_min_per_second",
        "budget_ratio",
        "clock",
        "max_attempts",
        "max_delay",
        "multiplier",
        "random",
        "retryable",
    )

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        multiplier: float = 2.0,
        retryable: Iterable[Status] = RETRYABLE,
        budget: RetryBudget | None = None,
        budget_ratio: float = 0.2,
        budget_min_per_second: float = 1.0,
        random: Random = _random.random,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_attempts < 1:
            raise UsageError("RetryPolicy: max_attempts must be at least 1")
        if not (0 <= base_delay <= max_delay) or multiplier < 1:
            raise UsageError("RetryPolicy: need 0 <= base_delay <= max_delay and multiplier >= 1")
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.multiplier = multiplier
        self.retryable = frozenset(retryable)
        self.budget = budget
        self.budget_ratio = budget_ratio
        self.budget_min_per_second = budget_min_per_second
        self.random = random
        self.clock = clock

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_attempts={self.max_attempts}, base_delay={self.base_delay}, "
            f"max_delay={self.max_delay}, retryable={sorted(s.name for s in self.retryable)})"
        )

    def new_budget(self) -> RetryBudget:
        """The budget a client using this policy draws on (the shared one, if given)."""
        if self.budget is not None:
            return self.budget
        return RetryBudget(ratio=self.budget_ratio, min_per_second=self.budget_min_per_second, clock=self.clock)

    def backoff(self, attempt: int) -> float:
        """The jittered wait after failed attempt number ``attempt`` (1 = the first)."""
        ceiling = self.base_delay * self.multiplier ** min(attempt - 1, 64)  # no float overflow
        return self.random() * min(self.max_delay, ceiling)

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """The wait after failed attempt ``attempt``, at least ``retry_after``; None if that is too long."""
        wait = self.backoff(attempt)
        if retry_after is not None and retry_after > 0:
            if retry_after > self.max_delay:
                return None
            wait = max(wait, retry_after)
        return wait

    def may_retry(self, error: BaseException) -> bool:
        """Whether ``error`` could lead to another attempt at all (a cheap first filter)."""
        return isinstance(error, CallError) and (isinstance(error, NotStarted) or error.status in self.retryable)

    def next_delay(
        self, error: BaseException, attempt: int, *, idempotent: bool, deadline: float | None = None
    ) -> float | None:
        """Seconds to wait before trying again after attempt ``attempt`` failed with ``error``; None: give up.

        ``deadline`` is the call's, on ``clock``'s scale. The budget is not
        consulted here (see ``Attempts``).
        """
        if not idempotent or attempt >= self.max_attempts:
            return None
        if not isinstance(error, CallError) or error.status not in self.retryable:
            return None
        wait = self.delay(attempt, error.retry_after)
        if wait is None or (deadline is not None and self.clock() + wait >= deadline):
            return None
        return wait

    def attempts(self, budget: RetryBudget | None, *, deadline: float | None, idempotent: bool | None) -> Attempts:
        """The retry state of one call, made when its first attempt has failed."""
        return Attempts(self, budget, deadline=deadline, idempotent=idempotent)


class Attempts:
    """One call's retries: how many were made, and whether the call is known idempotent.

    ``idempotent`` is None while unknown (the client may learn it, see
    ``needs_idempotency``), which counts as not idempotent.
    """

    __slots__ = ("_budget", "_policy", "_replayed", "attempt", "deadline", "idempotent")

    def __init__(
        self, policy: RetryPolicy, budget: RetryBudget | None, *, deadline: float | None, idempotent: bool | None
    ) -> None:
        self._policy = policy
        self._budget = budget
        self._replayed = False
        self.deadline = deadline
        self.idempotent = idempotent
        self.attempt = 1  # the attempt that failed last

    def needs_idempotency(self, error: BaseException) -> bool:
        """Whether deciding about ``error`` needs to know if the method is idempotent (and that is unknown)."""
        if self.idempotent is not None or not isinstance(error, CallError):
            return False
        if isinstance(error, NotStarted) and not self._replayed:
            return False
        return error.status in self._policy.retryable

    def next_delay(self, error: BaseException) -> float | None:
        """Seconds to wait before the next attempt, or None to raise ``error``; counts the retry."""
        policy = self._policy
        if isinstance(error, NotStarted) and not self._replayed:
            # Never started: replay it once, now, whatever the method; not a retry.
            self._replayed = True
            if self.deadline is not None and policy.clock() >= self.deadline:
                return None
            return 0.0
        wait = policy.next_delay(error, self.attempt, idempotent=bool(self.idempotent), deadline=self.deadline)
        if wait is None:
            return None
        budget = self._budget
        if budget is not None:
            if not budget.can_retry():
                return None
            budget.on_retry()
        self.attempt += 1
        return wait

    def remaining(self) -> float | None:
        """Seconds left before the deadline (at least a millisecond), or None without one."""
        if self.deadline is None:
            return None
        return max(0.001, self.deadline - self._policy.clock())


class IdempotentMethods:
    """Which methods one server connection declares idempotent, from its ``admin.methods`` listing.

    The client fetches the listing at most once per connection, and only when
    a call whose idempotency it does not know has failed retryably. Until it
    has the listing -- and for good if the server will not give it (no admin
    service, no permission, a malformed answer) -- no method counts as
    idempotent. A transient failure (UNAVAILABLE, RESOURCE_EXHAUSTED, a
    deadline, a lost connection) allows another fetch after
    ``refetch_after`` seconds, so an overloaded server is asked again later,
    not at every failure.
    """

    __slots__ = ("_clock", "_names", "_next_fetch", "refetch_after")

    def __init__(self, *, clock: Clock = time.monotonic, refetch_after: float = 10.0) -> None:
        self._clock = clock
        self._names: frozenset[str] | None = None
        self._next_fetch: float | None = None
        self.refetch_after = refetch_after

    def lookup(self, method: str) -> bool | None:
        """True/False from the listing; None if the listing is not known (yet)."""
        return None if self._names is None else method in self._names

    def should_fetch(self) -> bool:
        """Whether to ask the server for its listing now."""
        return self._names is None and (self._next_fetch is None or self._clock() >= self._next_fetch)

    def learn(self, listing: Any) -> None:
        """Take the names flagged idempotent from an ``admin.methods`` answer (anything malformed: none)."""
        names: set[str] = set()
        if isinstance(listing, list):
            for service in listing:
                methods = service.get("methods") if isinstance(service, dict) else None
                for method in methods if isinstance(methods, list) else ():
                    if isinstance(method, dict) and method.get("idempotent") is True:
                        name = method.get("name")
                        if isinstance(name, str):
                            names.add(name)
        self._names = frozenset(names)

    def failed(self, error: BaseException) -> None:
        """The fetch failed with ``error``: give up on this connection, or wait and try again later."""
        transient = isinstance(error, TransportError | TimeoutError) or (
            isinstance(error, CallError) and error.status in RETRYABLE
        )
        if transient:
            self._next_fetch = self._clock() + self.refetch_after
        else:
            self._names = frozenset()


def is_replayable(items: object) -> bool:
    """Whether a call's input stream can be sent again: none, or a sequence (not a one-shot iterator)."""
    return items is None or isinstance(items, list | tuple | range)


#: What clients use unless given ``retry=``: the defaults above (each client gets its own budget).
DEFAULT_RETRY = RetryPolicy()
