"""Client-side load balancing: endpoints, a circuit breaker each, power-of-two-choices.

Theory of operation. A client given several addresses (``Client(["a:7400",
"b:7400"])``, ``Client("a:7400,b:7400")``, or ``Client("dns:///name:7400")``
for every address a name resolves to) keeps one ``Endpoint`` per address,
each with its own connection, its count of calls outstanding and a
``CircuitBreaker``. For each call ``Balancer.pick`` draws two endpoints at
random among those whose breaker lets calls through and takes the one with
fewer calls outstanding (power of two choices: nearly as good as least-loaded,
without a global scan or herding onto one "best" endpoint).

The breaker is closed while the endpoint works. ``failure_threshold``
failures in a row -- connections refused or lost, handshakes failed, not
ready in an active health check -- open it: no calls go there for
``reset_timeout`` seconds, doubling (with jitter) each time it opens again,
up to ``max_reset_timeout``. (That paces where calls go; how soon a client
connects to an address again after failing is each endpoint's
``ReconnectBackoff``, below.) Then it is
half-open: one trial (a health check, ``admin.ready``) is let through; a
success closes it, a failure opens it again. A server that answers the trial
with UNIMPLEMENTED, UNAUTHENTICATED or PERMISSION_DENIED is up and answering,
only without a readiness check for this client (no admin service, say): that
is a success (``trial_passed``), or such an endpoint could never come back. A go-away (the server is
draining) opens it at once. When every endpoint is open the balancer still
picks one (the soonest to half-open), so a call fails with the real error
rather than an invented one.

Nothing here does I/O; clocks and randomness are injectable for tests.
"""

from __future__ import annotations

import enum
import ipaddress
import random as _random
import time
from collections.abc import Callable, Iterable, Sequence

from bastion.client._common import parse_address
from bastion.exceptions import CallError, UsageError
from bastion.status import Status

__all__ = [
    "DNS_SCHEME",
    "Balancer",
    "BreakerState",
    "CircuitBreaker",
    "Endpoint",
    "ReconnectBackoff",
    "expand_endpoints",
    "is_ip",
    "parse_endpoints",
    "trial_passed",
]

Clock = Callable[[], float]
Random = Callable[[], float]
#: An address with this prefix stands for every address its name resolves to.
DNS_SCHEME = "dns:///"


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` failures in a row -> half-open after a backoff -> closed."""

    __slots__ = (
        "_clock",
        "_failures",
        "_open_until",
        "_opened",
        "_random",
        "_trial",
        "failure_threshold",
        "max_reset_timeout",
        "reset_timeout",
    )

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_timeout: float = 0.5,
        max_reset_timeout: float = 30.0,
        clock: Clock = time.monotonic,
        random: Random = _random.random,
    ) -> None:
        if failure_threshold < 1 or not 0 < reset_timeout <= max_reset_timeout:
            raise UsageError("CircuitBreaker: need failure_threshold >= 1 and 0 < reset_timeout <= max_reset_timeout")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.max_reset_timeout = max_reset_timeout
        self._clock = clock
        self._random = random
        self._failures = 0  # in a row
        self._opened = 0  # times opened since last closed: the backoff exponent
        self._open_until: float | None = None
        self._trial = False  # half-open: the one trial is out

    @property
    def state(self) -> BreakerState:
        if self._open_until is None:
            return BreakerState.CLOSED
        if self._clock() < self._open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    @property
    def open_until(self) -> float | None:
        """When an open breaker turns half-open (None: closed)."""
        return self._open_until

    def available(self) -> bool:
        """Whether a call may go now: closed, or half-open with no trial out."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._trial)

    def begin_trial(self) -> bool:
        """Half-open: take the one trial (True); otherwise False."""
        if self.state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def on_success(self) -> None:
        self._failures = 0
        self._opened = 0
        self._open_until = None
        self._trial = False

    def on_failure(self) -> None:
        """A failure: counts towards opening; in half-open it reopens at once."""
        self._failures += 1
        if self.state is not BreakerState.CLOSED or self._failures >= self.failure_threshold:
            self.trip()

    def trip(self) -> None:
        """Open now (or again), for the next backoff."""
        ceiling = min(self.max_reset_timeout, self.reset_timeout * 2 ** min(self._opened, 32))
        wait = ceiling * (0.5 + 0.5 * self._random())  # jitter: replicas' clients do not return in step
        self._opened += 1
        self._open_until = self._clock() + wait
        self._trial = False

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.state.value}, failures={self._failures})"


class ReconnectBackoff:
    """How long to wait before the next attempt at connecting to one address: exponential, full jitter, capped.

    Without it, a client whose server is down (or refuses it, or accepts and
    drops it) tries again as fast as its calls come, and every client of a
    fleet does the same: the server, restarting, is hammered. Each failed
    attempt (``on_failure``: connection refused, handshake failed or refused)
    and each connection lost (``on_lost``) makes the next attempt wait a
    random time in ``[0, min(max_delay, base_delay * multiplier**(n-1))]``
    after the n-th failure in a row ("full jitter": clients that failed
    together do not come back together). A connection that opens resets it
    (``on_success``) -- unless it is lost within ``max_delay`` seconds, which
    proves nothing (a server that accepts and then drops every connection):
    then the count goes on from where it was. The first attempt does not
    wait; the first after a connection that lived waits at most ``base_delay``.

    The wait is drawn once per failure and shared (``ready_at``): every call
    waiting for the connection waits for the same attempt. Nothing here does
    I/O; clock and randomness are injectable for tests.
    """

    __slots__ = (
        "_clock",
        "_connected_at",
        "_random",
        "_streak",
        "base_delay",
        "failures",
        "max_delay",
        "multiplier",
        "ready_at",
    )

    def __init__(
        self,
        *,
        base_delay: float = 0.1,
        max_delay: float = 5.0,
        multiplier: float = 2.0,
        clock: Clock = time.monotonic,
        random: Random = _random.random,
    ) -> None:
        if not 0 < base_delay <= max_delay or multiplier < 1:
            raise UsageError("ReconnectBackoff: need 0 < base_delay <= max_delay and multiplier >= 1")
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.multiplier = multiplier
        self._clock = clock
        self._random = random
        #: Failed attempts (and connections lost) in a row.
        self.failures = 0
        #: When the next attempt may start (``clock`` time).
        self.ready_at = 0.0
        self._streak = 0  # failures before the last success: where a hollow success goes on from
        self._connected_at: float | None = None

    def delay(self) -> float:
        """Seconds to wait before the next attempt (0: try now)."""
        return max(0.0, self.ready_at - self._clock()) if self.failures else 0.0

    def on_failure(self) -> None:
        """An attempt failed: the next waits longer."""
        self.failures += 1
        ceiling = min(self.max_delay, self.base_delay * self.multiplier ** min(self.failures - 1, 64))
        self.ready_at = self._clock() + self._random() * ceiling

    def on_success(self) -> None:
        """A connection opened: back to no wait."""
        self._streak = self.failures
        self.failures = 0
        self._connected_at = self._clock()

    def on_lost(self) -> None:
        """The connection opened last was lost (not drained, not closed by the client)."""
        connected_at, self._connected_at = self._connected_at, None
        if connected_at is not None and self._clock() - connected_at < self.max_delay:
            self.failures = max(self.failures, self._streak)  # a success that proved nothing
        self.on_failure()

    def __repr__(self) -> str:
        return f"ReconnectBackoff(failures={self.failures}, delay={self.delay():.3f})"


#: Answers to a trial's ``admin.ready`` that show a server up, only without a readiness check for this client.
_ANSWERING = frozenset({Status.UNIMPLEMENTED, Status.UNAUTHENTICATED, Status.PERMISSION_DENIED})


def trial_passed(answer: object, error: BaseException | None) -> bool:
    """Whether a half-open endpoint's trial passed: ``admin.ready``'s ``answer``, or the ``error`` it failed with."""
    if error is not None:
        return isinstance(error, CallError) and error.status in _ANSWERING
    return isinstance(answer, dict) and answer.get("ready") is True


class Endpoint:
    """One server address: its breaker, its reconnect backoff and its calls outstanding.

    ``server_hostname``: the name to verify the server's certificate against
    (the DNS name an address was resolved from).
    """

    __slots__ = ("backoff", "breaker", "host", "outstanding", "port", "server_hostname")

    def __init__(
        self,
        host: str,
        port: int,
        breaker: CircuitBreaker,
        server_hostname: str | None = None,
        backoff: ReconnectBackoff | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.server_hostname = server_hostname
        self.breaker = breaker
        self.backoff = backoff if backoff is not None else ReconnectBackoff()
        self.outstanding = 0

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<Endpoint {self.address} {self.breaker.state.value} outstanding={self.outstanding}>"


class Balancer:
    """Picks an endpoint for each call: power of two choices on calls outstanding, healthy ones first."""

    def __init__(self, endpoints: Sequence[Endpoint], *, random: Random = _random.random) -> None:
        if not endpoints:
            raise UsageError("a balancer needs at least one endpoint")
        self.endpoints = list(endpoints)
        self._random = random

    def pick(self, exclude: Iterable[Endpoint] = ()) -> Endpoint:
        """An endpoint for the next call, avoiding ``exclude`` (those that already failed it) if others remain."""
        skip = set(map(id, exclude))
        allowed = [e for e in self.endpoints if id(e) not in skip] or self.endpoints
        healthy = [e for e in allowed if e.breaker.available()]
        if not healthy:  # all open: the one that half-opens first
            return min(allowed, key=lambda e: e.breaker.open_until or 0.0)
        if len(healthy) == 1:
            return healthy[0]
        n = len(healthy)
        i = min(int(self._random() * n), n - 1)
        j = min(int(self._random() * (n - 1)), n - 2)
        j += j >= i  # a second, different one
        a, b = healthy[i], healthy[j]
        return b if b.outstanding < a.outstanding else a


def parse_endpoints(address: str | Sequence[str]) -> tuple[list[tuple[str, int]], bool]:
    """The (host, port) pairs an address argument names, and whether to balance over them.

    One address (no comma, no ``dns:///``) is the classic single-server
    client. Several (a list, or commas), or ``dns:///host:port``, balance;
    in a balanced client every host name stands for all its addresses.
    """
    items = [address] if isinstance(address, str) else list(address)
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    if not parts:
        raise UsageError("no server address given")
    balanced = len(parts) > 1 or any(p.startswith(DNS_SCHEME) for p in parts)
    pairs = [parse_address(p[len(DNS_SCHEME) :] if p.startswith(DNS_SCHEME) else p) for p in parts]
    return pairs, balanced


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def expand_endpoints(
    pairs: Iterable[tuple[str, int]],
    resolve: Callable[[str, int], list[str]],
    make_breaker: Callable[[], CircuitBreaker],
    make_backoff: Callable[[], ReconnectBackoff] = ReconnectBackoff,
) -> list[Endpoint]:
    """One endpoint per address: IP literals as they are, names through ``resolve`` (all their addresses)."""
    endpoints: list[Endpoint] = []
    seen: set[tuple[str, int]] = set()
    for host, port in pairs:
        if is_ip(host):
            addresses, name = [host], None
        else:
            addresses, name = resolve(host, port), host
        for ip in addresses:
            if (ip, port) not in seen:
                seen.add((ip, port))
                endpoints.append(Endpoint(ip, port, make_breaker(), server_hostname=name, backoff=make_backoff()))
    if not endpoints:
        raise UsageError("no server address resolved")
    return endpoints
