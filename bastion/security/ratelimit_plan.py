"""The rate-limit configuration compiled into per-method plans, shared by both limiter backends.

``_Compiled`` turns a ``RateLimitConfig`` (ratelimit.py) into the limits it
names (``_Bucket``) and, per method name, what a call costs and which rules
charge it (``_Plan``, worked out once and cached). ``RateLimiter``
(ratelimit.py) and ``RedisRateLimiter`` (ratelimit_redis.py) both charge
calls by these plans; the rule selection here also checks the configuration.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec

from bastion.exceptions import ResourceExhausted
from bastion.security.principal import Principal
from bastion.security.throttle import source_key

if TYPE_CHECKING:
    from bastion.security.ratelimit import RateLimitConfig, RateRule

_GLOB_CHARS: Final = frozenset("*?[")
_MAX_PLANS: Final = 4096  # method names remembered; the cache is dropped when full


def _select_rules(method: str, rules: Sequence[RateRule]) -> list[tuple[int, RateRule]]:
    """(index, rule) of the most specific rule matching ``method`` for each role (None included)."""
    best: dict[str | None, tuple[tuple[int, int], int, RateRule]] = {}
    for i, rule in enumerate(rules):  # in listed order: a tie keeps the first
        if fnmatch.fnmatchcase(method, rule.method):
            rank = _specificity(rule.method)
            if rule.role not in best or rank > best[rule.role][0]:
                best[rule.role] = (rank, i, rule)
    return [(i, rule) for _, i, rule in best.values()]


def _specificity(pattern: str) -> tuple[int, int]:
    """Bigger is more specific: exact names first, then globs by literal characters."""
    if _GLOB_CHARS.isdisjoint(pattern):
        return (1, len(pattern))
    return (0, sum(c not in _GLOB_CHARS for c in pattern))


class _Bucket(msgspec.Struct, frozen=True):
    """One applicable limit, as compiled from the configuration."""

    index: int  # position among all limits (the in-memory bucket key)
    key: str  # stable id (the Redis key suffix): "principal", "source" or "rule:<method>|<role>"
    name: str  # how messages name it
    method: str
    role: str | None
    rate: float
    burst: float

    def describe(self, tokens: float) -> dict[str, Any]:
        return {
            "limit": self.name,
            "method": self.method,
            "role": self.role,
            "rate": self.rate,
            "burst": self.burst,
            "tokens": tokens,
        }


#: One bucket a call is charged to: its key in the limiter's map, its rate, its burst, its limit.
_Step = tuple[str, float, float, _Bucket]
#: A call's charge: its cost, its steps (None: an anonymous caller, keyed by source address), its
#: limits, and the first of them whose burst is below the cost (None: the call can pass).
_Charge = tuple[float, list[_Step] | None, list[_Bucket], _Bucket | None]


def _bucket_key(identity: str, limit: _Bucket) -> str:
    """A bucket's key in memory: the caller's identity and the limit (a str keeps its hash)."""
    return f"{identity}#{limit.index}"


class _Plan(msgspec.Struct, frozen=True):
    """What a call to one method is charged: its cost and the rules for it, by role."""

    cost: float
    rules: tuple[_Bucket, ...]  # at most one per role (None included)


class _Compiled:
    """The configuration turned into per-method plans (cached: the hot path is one dict lookup)."""

    def __init__(self, config: RateLimitConfig) -> None:
        self.config = config
        limits: list[_Bucket] = []
        self.principal: _Bucket | None = None
        self.source: _Bucket | None = None
        if config.per_principal is not None:
            self.principal = _Bucket(
                len(limits),
                "principal",
                "per-principal limit",
                "*",
                None,
                config.per_principal.rate,
                config.per_principal.burst,
            )
            limits.append(self.principal)
        if config.per_source is not None:
            self.source = _Bucket(
                len(limits), "source", "per-source limit", "*", None, config.per_source.rate, config.per_source.burst
            )
            limits.append(self.source)
        self.rules: list[_Bucket] = []
        for rule in config.rules:
            who = "everyone" if rule.role is None else f"role {rule.role}"
            bucket = _Bucket(
                len(limits),
                f"rule:{rule.method}|{rule.role or '*'}",
                f"limit on {rule.method} for {who}",
                rule.method,
                rule.role,
                rule.rate,
                rule.burst,
            )
            limits.append(bucket)
            self.rules.append(bucket)
        self._plans: dict[str, _Plan] = {}
        self._ipv6_prefix = config.ipv6_prefix

    def plan(self, method: str) -> _Plan:
        plan = self._plans.get(method)
        if plan is None:
            plan = self._compile(method)
            if len(self._plans) >= _MAX_PLANS:  # only unknown method names could grow it this far
                self._plans.clear()
            self._plans[method] = plan
        return plan

    def _compile(self, method: str) -> _Plan:
        rules = tuple(self.rules[i] for i, _ in _select_rules(method, self.config.rules))
        cost = 1.0
        cost_rank: tuple[int, int] | None = None
        for pattern, value in self.config.costs.items():
            if fnmatch.fnmatchcase(method, pattern):
                rank = _specificity(pattern)
                if cost_rank is None or rank > cost_rank:
                    cost, cost_rank = float(value), rank
        return _Plan(cost, rules)

    def identity(self, principal: Principal, source: str) -> str:
        if principal.authenticated:
            return "principal:" + principal.name
        return "source:" + self.source_key(source)

    def source_key(self, source: str) -> str:
        return source_key(source, self._ipv6_prefix)

    def applicable(self, principal: Principal, method: str) -> tuple[_Plan, list[_Bucket]]:
        plan = self.plan(method)
        base = self.principal if principal.authenticated else self.source
        buckets = [] if base is None else [base]
        roles = principal.roles
        for bucket in plan.rules:
            if bucket.role is None or bucket.role in roles:
                buckets.append(bucket)
        return plan, buckets

    def charge(self, principal: Principal, method: str, cost: float | None) -> tuple[float, list[_Bucket]] | None:
        """The cost to charge and the buckets to charge it to; None when there is nothing to charge."""
        plan, buckets = self.applicable(principal, method)
        if cost is None:
            cost = plan.cost
        elif not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        if cost == 0 or not buckets:
            return None
        return cost, buckets

    def all_for(self, principal: Principal) -> list[_Bucket]:
        """Every limit that can apply to this principal (for usage reports)."""
        base = self.principal if principal.authenticated else self.source
        out = [] if base is None else [base]
        out.extend(b for b in self.rules if b.role is None or b.role in principal.roles)
        return out

    @staticmethod
    def refusal(bucket: _Bucket, wait: float, cost: float) -> ResourceExhausted:
        details = {"limit": bucket.name, "rate": bucket.rate, "burst": bucket.burst, "cost": cost}
        if cost > bucket.burst:
            return ResourceExhausted(
                f"rate limited: this call costs {cost:g}, more than the {bucket.name} "
                f"allows at once (burst {bucket.burst:g})",
                details=details,
            )
        return ResourceExhausted(
            f"rate limited by the {bucket.name} ({bucket.rate:g}/s, burst {bucket.burst:g})",
            details=details,
            retry_after=wait,
        )

    def report(self, identity: str, limits: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "enabled": self.config.enabled,
            "identity": identity,
            "limits": limits,
            "costs": {k: float(v) for k, v in self.config.costs.items()},
            "default_cost": 1.0,
        }
