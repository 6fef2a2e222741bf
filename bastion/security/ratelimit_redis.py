"""The rate limiter with its token buckets in Redis, so limits hold across server replicas.

Same limits, rules, costs and semantics as the in-memory ``RateLimiter``
(see ratelimit.py); only where the buckets live differs. Each check is one
round trip: a Lua script (sent by EVALSHA, loaded on NOSCRIPT) refills every
applicable bucket, and debits all of them only if all can pay -- atomically,
so concurrent replicas can never overspend a budget.

Keys: ``<prefix>{<identity>}:<limit>`` (e.g. ``bastion:rl:{principal:ada}:rule:kv.put|user``),
one hash {t: tokens, s: stamp} each; the identity is a Redis Cluster hash
tag, so the keys of one check share a slot. Each key expires once its
bucket would have refilled completely (burst / rate seconds, plus a second),
after which a missing key means exactly the same thing: a full bucket. Time
is Redis's own clock (TIME) unless the caller passes ``now``, so replica
clocks need not agree.

When Redis cannot be reached (or takes longer than ``redis_timeout``), the
limiter by default fails open to an in-memory limiter -- the limits then
hold per replica instead of across them; with ``redis_fail_open = false``
it refuses calls as UNAVAILABLE. Either way it logs a warning at most once a
minute.
A failure also stops the limiter asking Redis for ``RETRY_AFTER`` seconds;
then one check at a time tries it again (the others answer as if it failed)
until one gets through. So a Redis that hangs costs one ``redis_timeout``
per second, not one per call, and does not pile up waiting checks.

The ``redis`` package is optional: ``pip install 'bastion[redis]'``.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, cast

from bastion.exceptions import Unavailable, UsageError
from bastion.security.principal import Principal
from bastion.security.ratelimit import RateLimitConfig, RateLimiter
from bastion.security.ratelimit_plan import _Bucket, _Compiled
from bastion.security.redis_gate import LUA_NOW, RedisGate

__all__ = ["SCRIPT", "RedisRateLimiter", "redis_module"]

log = logging.getLogger("bastion.ratelimit")

_INSTALL_HINT: Final = "the Redis rate limiter needs the redis package: pip install 'bastion[redis]'"
_WARN_EVERY: Final = 60.0  # seconds between "Redis is failing" warnings
#: KEYS: one hash per bucket. ARGV: now ('' = Redis TIME), cost, then rate and burst per key.
#: Returns {1} when charged, or {0, index of the bucket that waits longest (1-based), wait seconds}.
SCRIPT: Final = (
    LUA_NOW
    + """local cost = tonumber(ARGV[2])
local EPSILON = 1e-9  -- as ratelimit.EPSILON: forgive float rounding in refills
local tokens, stamps = {}, {}
local worst, worst_i = 0, 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  local state = redis.call('HMGET', key, 't', 's')
  local t, s = tonumber(state[1]), tonumber(state[2])
  if t == nil or s == nil then
    t, s = burst, now
  elseif now > s then
    t = math.min(burst, t + (now - s) * rate)
    s = now
  end
  tokens[i], stamps[i] = t, s
  if cost - t > EPSILON then
    local wait = (cost - t) / rate
    if wait > worst then
      worst, worst_i = wait, i
    end
  end
end
if worst_i > 0 then
  return {0, worst_i, string.format('%.17g', worst)}
end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  redis.call('HSET', key, 't', string.format('%.17g', tokens[i] - cost), 's', string.format('%.17g', stamps[i]))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
end
return {1}
"""
)


class _Client(Protocol):
    """The part of redis.asyncio.Redis used here."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]: ...

    def script_load(self, script: str) -> Awaitable[Any]: ...

    def time(self) -> Awaitable[Any]: ...

    def hmget(self, name: str, keys: Any, *args: Any) -> Awaitable[Any]: ...


def redis_module() -> Any:
    """The ``redis`` package (``redis.asyncio`` and ``redis.exceptions`` imported), or UsageError with the install
    hint when it is not installed (it is optional: ``bastion[redis]``)."""
    try:
        import redis.asyncio
        import redis.exceptions
    except ImportError as exc:
        raise UsageError(_INSTALL_HINT) from exc
    return redis


def check_url(url: str) -> None:
    """UsageError if redis cannot use ``url`` (``rate_limits.redis_url``), said without the URL: it may hold a
    password, and a host or port that does not parse is often one whose reserved characters were not
    percent-encoded (``redis://:s3/cret@host``: the "port" would be quoted, and it is the password's start)."""
    try:
        split = urllib.parse.urlsplit(url)
        split.port  # noqa: B018 (parsing it is the check)
        if split.scheme != "unix" and "@" in split.path + split.query + split.fragment:
            # an @ past the authority: a password's ``@`` and ``/``, ``?`` or ``#`` (``:s3@cr/et@host``,
            # ``:1234#s3cret@host``) made urlsplit end the authority inside it, so another host would be asked
            # than the one shown (redacted by its last @). One meant in a query value is written %40; a unix://
            # socket path may hold one.
            raise ValueError("an @ after the host")
    except ValueError:
        raise UsageError(
            "rate_limits.redis_url is not a valid URL: check its host and port (a password's reserved characters, "
            "such as / ? # @ :, must be percent-encoded); it is not shown, as it may hold a password"
        ) from None
    try:
        redis_module().connection.parse_url(url)
    except ValueError as exc:  # its own checks (a query parameter of the wrong type) name parameters, not values
        raise UsageError(f"rate_limits.redis_url: {exc}") from None


class RedisRateLimiter:
    """Token buckets in Redis (see the module docstring); implements the ``Limiter`` protocol.

    ``client`` is a ``redis.asyncio.Redis`` (or compatible) client; ``from_url``
    makes one, which ``aclose`` then closes. ``clock`` serves only the
    in-memory fallback.
    """

    def __init__(
        self,
        client: Any,
        config: RateLimitConfig | None = None,
        *,
        prefix: str | None = None,
        fail_open: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        owns_client: bool = False,
    ) -> None:
        redis = redis_module()
        self.config = config or RateLimitConfig()
        self.prefix = self.config.redis_prefix if prefix is None else prefix
        self.fail_open = self.config.redis_fail_open if fail_open is None else fail_open
        self._client = cast(_Client, client)
        self._owns_client = owns_client
        self._compiled = _Compiled(self.config)
        self._local = RateLimiter(self.config, clock=clock)  # the fail-open fallback
        self._clock = clock
        self._warned_at: float | None = None
        self._script = SCRIPT
        self._gate = RedisGate(client, redis, on_back=lambda: log.info("Redis rate limiter answering again"))
        self._errors = self._gate.errors

    @classmethod
    def from_url(
        cls,
        url: str,
        config: RateLimitConfig | None = None,
        *,
        prefix: str | None = None,
        fail_open: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> RedisRateLimiter:
        """A limiter with its own connection pool to ``url`` (commands time out after ``redis_timeout``)."""
        config = config or RateLimitConfig()
        redis = redis_module()
        client = redis.asyncio.Redis.from_url(
            url, socket_timeout=config.redis_timeout, socket_connect_timeout=config.redis_timeout
        )
        return cls(client, config, prefix=prefix, fail_open=fail_open, clock=clock, owns_client=True)

    def key(self, identity: str, bucket: _Bucket) -> str:
        return f"{self.prefix}{{{identity}}}:{bucket.key}"

    async def check(
        self, principal: Principal, source: str, method: str, cost: float | None = None, now: float | None = None
    ) -> None:
        """Charge the call to every applicable bucket in Redis, or raise ResourceExhausted and charge nothing."""
        if not self.config.enabled:
            return
        charge = self._compiled.charge(principal, method, cost)
        if charge is None:
            return
        cost, limits = charge
        for limit in limits:
            if cost > limit.burst:
                raise self._compiled.refusal(limit, 0.0, cost)
        ident = self._compiled.identity(principal, source)
        keys = [self.key(ident, limit) for limit in limits]
        args: list[str] = ["" if now is None else repr(float(now)), repr(float(cost))]
        for limit in limits:
            args += (repr(limit.rate), repr(limit.burst))
        try:
            result = await self._gate.run(self._script, keys, args)
        except self._errors as exc:
            await self._failed(exc)
            self._local.check_sync(principal, source, method, cost, now)
            return
        if int(result[0]) == 1:
            return
        wait = float(_text(result[2]))
        raise self._compiled.refusal(limits[int(result[1]) - 1], wait, cost)

    async def _failed(self, exc: BaseException) -> None:
        """Fail open or closed (UNAVAILABLE), saying which in the log at most once a minute."""
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning(
                "Redis rate limiter failing (%s: %s); %s meanwhile",
                type(exc).__name__,
                exc,
                "limiting per process from memory" if self.fail_open else "refusing calls (redis_fail_open = false)",
            )
        if not self.fail_open:
            raise Unavailable("rate limiter unavailable", retry_after=1.0) from None

    async def usage(self, principal: Principal, source: str, now: float | None = None) -> dict[str, Any]:
        """The caller's limits and tokens left, as ``RateLimiter.usage_sync`` reports them, read from Redis."""
        ident = self._compiled.identity(principal, source)
        buckets = self._compiled.all_for(principal)
        try:
            states, at = await self._gate.ask(self._read(ident, buckets, now))
        except self._errors as exc:
            await self._failed(exc)
            return await self._local.usage(principal, source, now)
        limits = []
        for bucket, (t, s) in zip(buckets, states, strict=True):
            if t is None or s is None:
                tokens = bucket.burst
            else:
                stamp = float(_text(s))
                tokens = min(bucket.burst, float(_text(t)) + max(0.0, at - stamp) * bucket.rate)
            limits.append(bucket.describe(tokens))
        return self._compiled.report(ident, limits)

    async def _read(self, ident: str, buckets: list[_Bucket], now: float | None) -> tuple[list[Any], float]:
        if now is None:
            seconds, micros = await self._client.time()
            now = int(seconds) + int(micros) / 1e6
        return [await self._client.hmget(self.key(ident, b), ["t", "s"]) for b in buckets], now

    async def aclose(self) -> None:
        """Close the client if this limiter made it (``from_url``)."""
        if self._owns_client:
            close = getattr(self._client, "aclose", None) or self._client.close  # type: ignore[attr-defined]
            await close()

    async def __aenter__(self) -> RedisRateLimiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
