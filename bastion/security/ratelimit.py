"""Rate limits and quotas on calls: token buckets per caller, per method, per role.

Theory of operation
-------------------

Every call is charged a *cost* (``costs[method]``, default 1) against a set of
token buckets; it passes only if **every** applicable bucket holds that many
tokens, and then (and only then) the cost is taken from all of them -- a
refused call debits nothing. A bucket holds at most ``burst`` tokens and
refills at ``rate`` tokens per second, so a caller may spend a burst at once
and then ``rate`` per second.

The applicable buckets of a call, all keyed by the caller's *identity* --
the principal's name when authenticated, else the source address (IPv6
sources are grouped by their ``/ipv6_prefix`` network, since one host
usually owns a whole /64):

* the caller's base bucket: ``per_principal`` for an authenticated principal,
  ``per_source`` for an anonymous caller (never both);
* for each role the caller holds, plus ``role = None`` ("everyone",
  anonymous callers included), the *most specific* rule matching the method
  name: an exact name beats a glob, among globs the one with more literal
  characters wins (``kv.put`` > ``kv.*`` > ``*``), a tie goes to the rule
  listed first. The winners of different roles all apply. So a specific rule
  can raise or lower a broad one for the same role, while a caller holding
  two limited roles is bound by both.

A rule's bucket is per identity and per rule: ``kv.* 1000/s for role user``
gives each user 1000 kv calls a second in total, not 1000 per method.
Roles match literally: ``admin`` passes every *role check* (see
principal.py) but is subject only to rules for roles it actually holds (and
role-less rules), so a ``user`` rule limits an admin only if the admin also
holds ``user``.

A refused call raises ``ResourceExhausted`` naming the limit, with
``retry_after`` = seconds until every bucket could pay the cost (assuming no
other traffic) and ``details`` = {limit, rate, burst, cost}. A call costing
more than some bucket's burst can never pass: it is refused without a
retry_after. A cost of 0 exempts a method (e.g. a health check) from every
limit.

A cost above ``per_principal.burst``, or above the burst of a rule that
would charge that (exactly named) method, is a configuration error; a cost
above ``per_source.burst`` is allowed (such methods are then closed to
anonymous callers, which is usually the point).

``now`` (seconds) is injectable for tests; by default the in-memory limiter
reads its ``clock`` (monotonic) and the Redis one uses Redis's TIME.

Backends: ``RateLimiter`` (here) keeps buckets in process memory, capped at
``max_tracked`` (least recently used forgotten first, i.e. refilled);
``RedisRateLimiter`` (ratelimit_redis.py) keeps them in Redis so the limits
hold across server replicas. Both implement the async ``Limiter`` protocol
(``await limiter.check(...)``, ``await limiter.usage(...)``) so the server
needs one code path; the in-memory one also offers ``check_sync`` and
``usage_sync``, which never await. ``create_limiter(config)`` picks the
backend from the configuration.

Configuration, as the ``[rate_limits]`` TOML section::

    [rate_limits]
    per_principal = { rate = 1000, burst = 2000 }
    per_source = { rate = 2000, burst = 4000 }
    costs = { "kv.scan" = 10, "health.check" = 0 }

    [[rate_limits.rules]]
    method = "kv.put"
    role = "user"
    rate = 100
    burst = 200
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import msgspec

from bastion.exceptions import UsageError
from bastion.security.principal import Principal
from bastion.security.ratelimit_plan import (
    _GLOB_CHARS,
    _MAX_PLANS,
    _Bucket,
    _bucket_key,
    _Charge,
    _Compiled,
    _select_rules,
    _Step,
)
from bastion.security.throttle import TokenBucket

if TYPE_CHECKING:
    from bastion.security.ratelimit_redis import RedisRateLimiter

__all__ = [
    "DEFAULT_REDIS_PREFIX",
    "EPSILON",
    "Limit",
    "Limiter",
    "RateLimitConfig",
    "RateLimiter",
    "RateRule",
    "create_limiter",
]

DEFAULT_REDIS_PREFIX: Final = "bastion:rl:"
_UNKNOWN: Final[Any] = object()
_MIN_TRACKED: Final = 64
#: Tokens a bucket may be short and still pay: refills are float arithmetic, and a caller
#: pacing itself exactly at the rate must not be refused for a rounding error.
EPSILON: Final = 1e-9


class Limit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A token bucket's shape: ``burst`` tokens at once, refilled at ``rate`` per second."""

    rate: float
    burst: float


class RateRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A limit on the methods matching ``method`` (an fnmatch glob) for holders of ``role``.

    ``role = None`` applies to every caller, anonymous ones included.
    """

    method: str
    rate: float
    burst: float
    role: str | None = None


class RateLimitConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Rate limits and call costs (the ``[rate_limits]`` section; see the module docstring).

    enabled: false turns every limit off.
    per_principal: each authenticated principal's bucket over all its calls (none: unlimited).
    per_source: each anonymous caller's bucket, per source address (none: unlimited).
    rules: per-method, per-role limits (most specific method pattern per role wins).
    costs: tokens a call to a method (exact name or glob) costs; default 1, 0 = exempt.
    ipv6_prefix: anonymous IPv6 callers are grouped by this network prefix length.
    max_tracked: buckets kept in memory (least recently used forgotten first).
    redis_url: keep the buckets in Redis (shared by replicas), e.g. redis://host:6379/0.
    redis_prefix: prefix of every Redis key.
    redis_timeout: seconds a Redis command may take before the limiter counts it failed.
    redis_fail_open: when Redis fails, limit per process from memory (true) or refuse
        calls as UNAVAILABLE (false).
    """

    enabled: bool = True
    per_principal: Limit | None = Limit(rate=1000.0, burst=2000.0)
    per_source: Limit | None = Limit(rate=2000.0, burst=4000.0)
    rules: list[RateRule] = []
    costs: dict[str, float] = {}
    ipv6_prefix: int = 64
    max_tracked: int = 100_000
    redis_url: str | None = None
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    redis_timeout: float = 0.25
    redis_fail_open: bool = True

    def __post_init__(self) -> None:
        for name in ("per_principal", "per_source"):
            limit = getattr(self, name)
            if limit is not None:
                _check_rate(f"rate_limits.{name}", limit.rate, limit.burst)
        seen: set[tuple[str, str | None]] = set()
        for i, rule in enumerate(self.rules):
            where = f"rate_limits.rules[{i}] ({rule.method!r}, role {rule.role!r})"
            _check_pattern(f"rate_limits.rules[{i}].method", rule.method)
            if rule.role is not None and (not rule.role or rule.role != rule.role.strip()):
                raise UsageError(f"{where}: role must be a non-empty name without surrounding spaces, or absent")
            _check_rate(where, rule.rate, rule.burst)
            if (rule.method, rule.role) in seen:
                raise UsageError(f"{where}: a rule for this method and role is already listed")
            seen.add((rule.method, rule.role))
        for method, cost in self.costs.items():
            _check_pattern(f"rate_limits.costs key {method!r}", method)
            if isinstance(cost, bool) or not isinstance(cost, int | float) or not math.isfinite(cost) or cost < 0:
                raise UsageError(f"rate_limits.costs[{method!r}] must be a number >= 0, got {cost!r}")
            self._check_cost_fits(method, cost)
        self._check_default_cost_fits()
        if not 1 <= self.ipv6_prefix <= 128:
            raise UsageError(f"rate_limits.ipv6_prefix must be 1..128, got {self.ipv6_prefix!r}")
        if self.max_tracked < _MIN_TRACKED:
            raise UsageError(f"rate_limits.max_tracked must be at least {_MIN_TRACKED}, got {self.max_tracked!r}")
        if self.redis_url is not None:  # (imports redis: only for a configuration that uses it)
            if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
                raise UsageError("rate_limits.redis_url must start with redis://, rediss:// or unix://")
            from bastion.security.ratelimit_redis import check_url

            check_url(self.redis_url)
        if not self.redis_prefix:
            raise UsageError("rate_limits.redis_prefix must not be empty")
        if not (math.isfinite(self.redis_timeout) and self.redis_timeout > 0):
            raise UsageError(f"rate_limits.redis_timeout must be a positive number, got {self.redis_timeout!r}")

    def _check_cost_fits(self, method: str, cost: float) -> None:
        """A cost above the burst of a bucket that would charge it refuses the method forever: a mistake.

        Not checked against per_source: a small anonymous allowance that no
        expensive (typically non-public) method fits in is a fair choice.
        """
        limit = self.per_principal
        if limit is not None and cost > limit.burst:
            raise UsageError(
                f"rate_limits.costs[{method!r}] = {cost:g} exceeds rate_limits.per_principal.burst = "
                f"{limit.burst:g}: such calls could never pass"
            )
        if _GLOB_CHARS.isdisjoint(method):  # an exact name: the rules that would charge it are known
            for i, rule in _select_rules(method, self.rules):
                if cost > rule.burst:
                    raise UsageError(
                        f"rate_limits.costs[{method!r}] = {cost:g} exceeds the burst {rule.burst:g} of "
                        f"rate_limits.rules[{i}] ({rule.method!r}, role {rule.role!r}): such calls could never pass"
                    )

    def _check_default_cost_fits(self) -> None:
        """The default cost, 1, is a cost too: a burst below it that charges it never lets a call pass."""
        limits = [(f"rules[{i}] ({r.method!r}, role {r.role!r})", r) for i, r in enumerate(self.rules)]
        if self.per_principal is not None:  # charges every method: "*" stands for them
            limits.append(("per_principal", RateRule("*", self.per_principal.rate, self.per_principal.burst)))
        for where, rule in limits:
            exact = where == "per_principal" or _GLOB_CHARS.isdisjoint(rule.method)
            if rule.burst < 1 and exact and not any(fnmatch.fnmatchcase(rule.method, p) for p in self.costs):
                raise UsageError(f"rate_limits.{where}: burst {rule.burst:g} is below the default cost 1 it charges")


def _check_rate(where: str, rate: object, burst: object) -> None:
    for name, value in (("rate", rate), ("burst", burst)):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if not ok:
            raise UsageError(f"{where}: {name} must be a positive number, got {value!r}")


def _check_pattern(where: str, pattern: str) -> None:
    if not pattern or any(c.isspace() for c in pattern):
        raise UsageError(f"{where} must be a method name or glob (e.g. 'kv.put', 'kv.*', '*'), got {pattern!r}")


@runtime_checkable
class Limiter(Protocol):
    """What the server calls: ``check`` before dispatching a call, ``usage`` for whoami/limits."""

    async def check(
        self, principal: Principal, source: str, method: str, cost: float | None = None, now: float | None = None
    ) -> None:
        """Charge the call, or raise ResourceExhausted (with retry_after) and charge nothing."""
        ...

    async def usage(self, principal: Principal, source: str, now: float | None = None) -> dict[str, Any]:
        """The caller's limits and the tokens it has left in each."""
        ...

    async def aclose(self) -> None:
        """Release connections (nothing for the in-memory limiter)."""
        ...


class RateLimiter:
    """Token buckets in process memory; limits hold per server process.

    Not thread-safe: call it from the event loop (check_sync never blocks).
    ``clock`` supplies ``now`` when a call does not (monotonic seconds).

    The hot path. What a principal's call to a method charges (its cost, and
    each bucket's key, rate and burst) is worked out once per principal object
    and method (``_known``; a session keeps one principal object, so this is per
    connection) and looked up by identity after that; ``forget`` drops it when
    the session closes or revalidation replaces its principal. Buckets stay an exact
    least-recently-used map: every charge moves its buckets to the young end,
    so a flood of new identities evicts the idle ones, never a busy caller's
    (whose bucket would come back full).
    """

    def __init__(self, config: RateLimitConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or RateLimitConfig()
        self._compiled = _Compiled(self.config)
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max = self.config.max_tracked
        self._enabled = self.config.enabled
        #: id(principal) -> (principal, {method: its charge at the configured cost}).
        self._known: dict[int, tuple[Principal, dict[str, _Charge | None]]] = {}

    def forget(self, principal: Principal) -> None:
        """Drop what ``principal``'s calls charge (its session is done with it); not ANONYMOUS's, shared."""
        if not principal.authenticated:
            return
        known = self._known.get(id(principal))
        if known is not None and known[0] is principal:
            del self._known[id(principal)]

    def __len__(self) -> int:
        """Buckets currently tracked."""
        return len(self._buckets)

    async def check(
        self, principal: Principal, source: str, method: str, cost: float | None = None, now: float | None = None
    ) -> None:
        self.check_sync(principal, source, method, cost, now)

    def check_sync(
        self, principal: Principal, source: str, method: str, cost: float | None = None, now: float | None = None
    ) -> None:
        """Charge ``cost`` (default: the method's configured cost) to every applicable bucket, or raise."""
        if not self._enabled:
            return
        if cost is None:  # the usual case: what this principal's calls to the method charge is known
            known = self._known.get(id(principal))
            if known is None or known[0] is not principal:  # new, or another object at a reused address
                if len(self._known) >= _MAX_PLANS:
                    self._known.clear()
                known = self._known[id(principal)] = (principal, {})
            charges = known[1]
            charge = charges.get(method, _UNKNOWN)
            if charge is _UNKNOWN:
                charge = self._charge(principal, source, method, None)
                if len(charges) >= _MAX_PLANS:
                    charges.clear()
                charges[method] = charge
        else:
            charge = self._charge(principal, source, method, cost)
        if charge is None:
            return
        cost, steps, limits, beyond = charge
        if beyond is not None:  # more than some bucket ever holds
            raise self._compiled.refusal(beyond, math.inf, cost)
        if steps is None:  # anonymous: keyed by the source address, which the charge cannot know
            steps = self._steps(limits, principal, source)
        if now is None:
            now = self.clock()
        items = self._buckets
        worst = 0.0
        refused: _Bucket | None = None
        taken: list[TokenBucket] = []
        for key, rate, burst, limit in steps:
            bucket = items.get(key)
            if bucket is None:
                bucket = items[key] = TokenBucket(burst, rate, now)
                if len(items) > self._max:
                    items.popitem(last=False)
            else:
                items.move_to_end(key)
            tokens = bucket.tokens
            if now > bucket.stamp:  # a clock stepping back refills nothing
                tokens += (now - bucket.stamp) * rate
                if tokens > burst:
                    tokens = burst
                bucket.tokens = tokens
                bucket.stamp = now
            if cost - tokens > EPSILON and (cost - tokens) / rate > worst:
                worst, refused = (cost - tokens) / rate, limit
            taken.append(bucket)
        if refused is not None:
            raise self._compiled.refusal(refused, worst, cost)
        for bucket in taken:
            bucket.tokens -= cost

    def _charge(self, principal: Principal, source: str, method: str, cost: float | None) -> _Charge | None:
        """What a call charges: its cost, its buckets' steps (for an authenticated principal), its limits,
        and the first limit whose burst is below the cost (if any: the call can never pass)."""
        charge = self._compiled.charge(principal, method, cost)
        if charge is None:
            return None
        cost, limits = charge
        beyond = next((limit for limit in limits if cost > limit.burst), None)
        steps = self._steps(limits, principal, source) if principal.authenticated else None
        return cost, steps, limits, beyond

    def _steps(self, limits: list[_Bucket], principal: Principal, source: str) -> list[_Step]:
        ident = self._compiled.identity(principal, source)
        return [(_bucket_key(ident, limit), limit.rate, limit.burst, limit) for limit in limits]

    async def usage(self, principal: Principal, source: str, now: float | None = None) -> dict[str, Any]:
        return self.usage_sync(principal, source, now)

    def usage_sync(self, principal: Principal, source: str, now: float | None = None) -> dict[str, Any]:
        """The caller's limits and tokens left, e.g.::

            {"enabled": True, "identity": "principal:ada", "default_cost": 1.0, "costs": {"kv.scan": 10.0},
             "limits": [{"limit": "per-principal limit", "method": "*", "role": None,
                         "rate": 1000.0, "burst": 2000.0, "tokens": 1990.0}, ...]}

        Reading changes nothing (not even which buckets are least recently used).
        """
        if now is None:
            now = self.clock()
        ident = self._compiled.identity(principal, source)
        limits = []
        for limit in self._compiled.all_for(principal):
            bucket = self._buckets.get(_bucket_key(ident, limit))
            if bucket is None:
                tokens = limit.burst
            else:
                tokens = min(limit.burst, bucket.tokens + max(0.0, now - bucket.stamp) * limit.rate)
            limits.append(limit.describe(tokens))
        return self._compiled.report(ident, limits)

    async def aclose(self) -> None:
        return None


def create_limiter(config: RateLimitConfig, *, clock: Callable[[], float] = time.monotonic) -> Limiter:
    """The limiter the configuration asks for: Redis-backed if ``redis_url`` is set, else in memory.

    ``clock`` is used by the in-memory limiter (and the Redis one's fail-open fallback).
    """
    if config.redis_url is None:
        return RateLimiter(config, clock=clock)
    from bastion.security.ratelimit_redis import RedisRateLimiter

    limiter: RedisRateLimiter = RedisRateLimiter.from_url(config.redis_url, config, clock=clock)
    return limiter
