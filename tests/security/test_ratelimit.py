"""Call rate limits: per principal / per source buckets, per-method per-role rules, costs, usage."""

from __future__ import annotations

import asyncio
import math
import tomllib
from typing import Any

import msgspec
import pytest

from bastion.exceptions import ResourceExhausted, UsageError
from bastion.security.principal import ANONYMOUS, Principal
from bastion.security.ratelimit import Limit, Limiter, RateLimitConfig, RateLimiter, RateRule, create_limiter
from bastion.service import Service
from bastion.testing import MemoryServer

ADA = Principal("ada", frozenset({"user"}))
BOB = Principal("bob", frozenset({"user"}))
ROOT = Principal("root", frozenset({"admin"}))
ROOT_USER = Principal("root2", frozenset({"admin", "user"}))

BIG = Limit(rate=1e6, burst=1e6)  # a base bucket that never gets in the way


def allowed(
    limiter: RateLimiter,
    n: int,
    principal: Principal = ADA,
    method: str = "kv.get",
    *,
    source: str = "10.0.0.1",
    now: float = 0.0,
    cost: float | None = None,
) -> int:
    """How many of ``n`` calls at the same instant pass."""
    ok = 0
    for _ in range(n):
        try:
            limiter.check_sync(principal, source, method, cost, now=now)
        except ResourceExhausted:
            pass
        else:
            ok += 1
    return ok


def tokens(limiter: RateLimiter, principal: Principal, now: float, limit: str, source: str = "10.0.0.1") -> float:
    report = limiter.usage_sync(principal, source, now=now)
    (value,) = [entry["tokens"] for entry in report["limits"] if entry["limit"] == limit]
    return float(value)


# -- buckets ---------------------------------------------------------------------------------------


def test_a_burst_passes_at_once_then_calls_refill_at_the_rate() -> None:
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=10, burst=20)))
    assert allowed(limiter, 50, now=0.0) == 20
    assert allowed(limiter, 50, now=0.5) == 5  # 0.5 s at 10/s
    assert allowed(limiter, 50, now=1.5) == 10
    assert allowed(limiter, 50, now=100.0) == 20  # refills to the burst, never beyond


def test_a_steady_caller_at_the_rate_is_never_refused() -> None:
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=100, burst=1)))
    for i in range(1000):
        limiter.check_sync(ADA, "10.0.0.1", "kv.get", now=i / 100)


def test_anonymous_callers_are_limited_per_source() -> None:
    limiter = RateLimiter(RateLimitConfig(per_principal=BIG, per_source=Limit(rate=1, burst=5)))
    assert allowed(limiter, 10, ANONYMOUS, source="192.0.2.1") == 5
    assert allowed(limiter, 10, ANONYMOUS, source="192.0.2.2") == 5  # another address has its own bucket
    assert allowed(limiter, 10, ADA, source="192.0.2.1") == 10  # an authenticated caller is not limited by source
    report = limiter.usage_sync(ANONYMOUS, "192.0.2.1", now=0.0)
    assert report["identity"] == "source:192.0.2.1"
    assert [e["limit"] for e in report["limits"]] == ["per-source limit"]


def test_anonymous_ipv6_callers_are_grouped_by_their_network() -> None:
    limiter = RateLimiter(RateLimitConfig(per_source=Limit(rate=1, burst=4)))
    assert allowed(limiter, 2, ANONYMOUS, source="2001:db8:1:2::1") == 2
    assert allowed(limiter, 4, ANONYMOUS, source="2001:db8:1:2:ffff::9") == 2  # same /64: same bucket
    assert allowed(limiter, 4, ANONYMOUS, source="2001:db8:1:3::1") == 4  # another /64
    assert allowed(limiter, 4, ANONYMOUS, source="::ffff:192.0.2.7") == 4
    assert allowed(limiter, 4, ANONYMOUS, source="192.0.2.7") == 0  # an IPv4-mapped address is that IPv4 address
    assert limiter.usage_sync(ANONYMOUS, "2001:db8:1:2::5", now=0)["identity"] == "source:2001:db8:1:2::/64"


def test_authenticated_callers_are_limited_per_principal_from_any_address() -> None:
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=1, burst=6), per_source=Limit(rate=1, burst=1)))
    assert allowed(limiter, 3, ADA, source="10.0.0.1") == 3
    assert allowed(limiter, 10, ADA, source="10.0.0.2") == 3  # the same principal elsewhere shares its bucket
    assert allowed(limiter, 10, BOB, source="10.0.0.1") == 6  # another principal is untouched
    assert limiter.usage_sync(ADA, "x", now=0)["identity"] == "principal:ada"


def test_a_missing_base_limit_means_unlimited() -> None:
    limiter = RateLimiter(RateLimitConfig(per_principal=None, per_source=None))
    assert allowed(limiter, 10_000, ADA) == 10_000
    assert allowed(limiter, 10_000, ANONYMOUS) == 10_000
    assert len(limiter) == 0


def test_disabled_limits_nothing() -> None:
    limiter = RateLimiter(RateLimitConfig(enabled=False, per_principal=Limit(rate=1, burst=1)))
    assert allowed(limiter, 100) == 100
    assert limiter.usage_sync(ADA, "x", now=0)["enabled"] is False


# -- rules ------------------------------------------------------------------------------------------


def test_a_rule_for_role_user_limits_users_not_admins_unless_they_hold_user_too() -> None:
    config = RateLimitConfig(per_principal=BIG, rules=[RateRule(method="kv.put", role="user", rate=100, burst=100)])
    limiter = RateLimiter(config)
    assert allowed(limiter, 300, ADA, "kv.put") == 100
    assert allowed(limiter, 300, ADA, "kv.put", now=0.5) == 50  # 100/s
    assert allowed(limiter, 300, ADA, "kv.get") == 300  # other methods are not covered by the rule
    assert allowed(limiter, 300, ROOT, "kv.put") == 300  # admin passes role checks, but rules match roles literally
    assert allowed(limiter, 300, ROOT_USER, "kv.put") == 100  # an admin who also holds "user" is a user here
    assert allowed(limiter, 300, ANONYMOUS, "kv.put") == 300  # no roles, so no role rule (per_source still applies)


def test_a_roleless_rule_applies_to_everyone_including_anonymous_by_source() -> None:
    config = RateLimitConfig(per_principal=BIG, per_source=BIG, rules=[RateRule(method="auth.*", rate=1, burst=3)])
    limiter = RateLimiter(config)
    assert allowed(limiter, 10, ANONYMOUS, "auth.login", source="192.0.2.1") == 3
    assert allowed(limiter, 10, ANONYMOUS, "auth.login", source="192.0.2.2") == 3
    assert allowed(limiter, 10, ROOT, "auth.whoami") == 3
    assert allowed(limiter, 10, ROOT, "kv.get") == 10


def test_the_most_specific_rule_per_role_wins_and_the_roles_winners_all_apply() -> None:
    config = RateLimitConfig(
        per_principal=BIG,
        rules=[
            RateRule(method="*", role="user", rate=1, burst=50),
            RateRule(method="kv.*", role="user", rate=1, burst=10),
            RateRule(method="kv.put", role="user", rate=1, burst=20),  # raises the kv.* limit for kv.put
            RateRule(method="kv.*", role="batch", rate=1, burst=5),
        ],
    )
    limiter = RateLimiter(config)
    assert allowed(limiter, 100, ADA, "kv.put") == 20  # kv.put, not kv.* nor *
    assert allowed(limiter, 100, ADA, "kv.get") == 10  # kv.*
    assert allowed(limiter, 100, ADA, "kv.scan") == 0  # kv.* is one budget for every kv method
    assert allowed(limiter, 100, ADA, "blob.get") == 50  # *
    carol = Principal("carol", frozenset({"user", "batch"}))
    assert allowed(limiter, 100, carol, "kv.get") == 5  # bound by the user rule and the batch rule
    report = limiter.usage_sync(carol, "x", now=0)
    assert {(e["method"], e["role"]) for e in report["limits"]} == {
        ("*", None),
        ("*", "user"),
        ("kv.*", "user"),
        ("kv.put", "user"),
        ("kv.*", "batch"),
    }


def test_rule_buckets_are_per_principal() -> None:
    config = RateLimitConfig(per_principal=BIG, rules=[RateRule(method="kv.put", role="user", rate=1, burst=2)])
    limiter = RateLimiter(config)
    assert allowed(limiter, 5, ADA, "kv.put") == 2
    assert allowed(limiter, 5, BOB, "kv.put") == 2


# -- costs and refusals -----------------------------------------------------------------------------


def test_costly_methods_weigh_more() -> None:
    config = RateLimitConfig(
        per_principal=Limit(rate=10, burst=100), costs={"kv.scan": 10, "kv.*": 2, "health.check": 0}
    )
    limiter = RateLimiter(config)
    assert allowed(limiter, 100, ADA, "kv.scan") == 10  # the exact cost beats the kv.* glob
    assert allowed(limiter, 100, BOB, "kv.get") == 50
    assert allowed(limiter, 1000, ADA, "health.check") == 1000  # cost 0: exempt from every limit
    carol = Principal("carol")
    assert allowed(limiter, 100, carol, "other", cost=25) == 4  # an explicit cost overrides the table
    assert limiter.usage_sync(ADA, "x", now=0)["costs"] == {"kv.scan": 10.0, "kv.*": 2.0, "health.check": 0.0}


def test_retry_after_is_the_time_until_the_cost_has_refilled() -> None:
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=5, burst=10)))
    assert allowed(limiter, 9) == 9
    with pytest.raises(ResourceExhausted) as info:
        limiter.check_sync(ADA, "10.0.0.1", "kv.get", cost=3, now=0.0)  # 1 token left, 2 missing at 5/s
    assert info.value.retry_after == pytest.approx(0.4)
    assert "per-principal limit" in info.value.message and "5/s" in info.value.message
    assert info.value.details == {"limit": "per-principal limit", "rate": 5.0, "burst": 10.0, "cost": 3.0}
    with pytest.raises(ResourceExhausted):
        limiter.check_sync(ADA, "10.0.0.1", "kv.get", cost=3, now=0.39)
    limiter.check_sync(ADA, "10.0.0.1", "kv.get", cost=3, now=0.4)  # retrying after retry_after works


def test_retry_after_is_the_longest_wait_among_the_buckets_and_names_that_limit() -> None:
    config = RateLimitConfig(
        per_principal=Limit(rate=10, burst=4), rules=[RateRule(method="kv.put", role="user", rate=1, burst=4)]
    )
    limiter = RateLimiter(config)
    assert allowed(limiter, 4, ADA, "kv.put") == 4
    with pytest.raises(ResourceExhausted) as info:
        limiter.check_sync(ADA, "10.0.0.1", "kv.put", now=0.0)
    assert info.value.retry_after == pytest.approx(1.0)  # the rule refills slower than the principal's bucket
    assert "kv.put for role user" in info.value.message


def test_a_refused_call_debits_no_bucket() -> None:
    config = RateLimitConfig(
        per_principal=Limit(rate=1, burst=10), rules=[RateRule(method="kv.put", role="user", rate=1, burst=2)]
    )
    limiter = RateLimiter(config)
    assert allowed(limiter, 5, ADA, "kv.put") == 2
    assert tokens(limiter, ADA, 0.0, "per-principal limit") == 8  # the 3 refused calls took nothing
    assert allowed(limiter, 100, ADA, "kv.get") == 8


def test_a_call_costing_more_than_a_burst_is_refused_without_retry_after() -> None:
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=1, burst=5)))
    with pytest.raises(ResourceExhausted) as info:
        limiter.check_sync(ADA, "x", "kv.scan", cost=6, now=0.0)
    assert info.value.retry_after is None and "costs 6" in info.value.message
    assert tokens(limiter, ADA, 0.0, "per-principal limit") == 5
    with pytest.raises(ValueError):
        limiter.check_sync(ADA, "x", "kv.scan", cost=-1)
    with pytest.raises(ValueError):
        limiter.check_sync(ADA, "x", "kv.scan", cost=math.nan)


def test_a_clock_stepping_back_refills_nothing_and_takes_nothing() -> None:
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=1, burst=2)))
    assert allowed(limiter, 1, now=100.0) == 1
    assert allowed(limiter, 5, now=50.0) == 1
    assert allowed(limiter, 5, now=101.0) == 1


def test_the_default_clock_is_used_when_now_is_not_given() -> None:
    clock = [0.0]
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=1, burst=1)), clock=lambda: clock[0])
    limiter.check_sync(ADA, "x", "kv.get")
    with pytest.raises(ResourceExhausted):
        limiter.check_sync(ADA, "x", "kv.get")
    clock[0] = 1.0
    limiter.check_sync(ADA, "x", "kv.get")


# -- memory bounds ----------------------------------------------------------------------------------


def test_bucket_memory_is_bounded_and_the_least_recently_used_are_forgotten() -> None:
    limiter = RateLimiter(RateLimitConfig(per_source=Limit(rate=1, burst=1), max_tracked=64))
    assert allowed(limiter, 1, ANONYMOUS, source="10.9.9.9") == 1
    for i in range(200):
        allowed(limiter, 1, ANONYMOUS, source=f"10.0.{i // 256}.{i % 256}")
        assert allowed(limiter, 1, ANONYMOUS, source="10.9.9.9") == 0  # kept: used the most recently
    assert len(limiter) == 64
    assert allowed(limiter, 1, ANONYMOUS, source="10.0.0.0") == 1  # forgotten: a fresh (full) bucket


def test_the_method_plan_cache_is_bounded() -> None:
    config = RateLimitConfig(per_principal=None, rules=[RateRule(method="kv.*", role="user", rate=1, burst=1)])
    limiter = RateLimiter(config)
    for i in range(10_000):
        limiter.check_sync(ADA, "x", f"junk.m{i}", now=0.0)
    assert len(limiter._compiled._plans) <= 4096
    assert allowed(limiter, 2, ADA, "kv.get") == 1


# -- usage --------------------------------------------------------------------------------------------


def test_usage_reports_the_callers_limits_and_tokens_left_without_changing_them() -> None:
    config = RateLimitConfig(
        per_principal=Limit(rate=10, burst=100),
        rules=[
            RateRule(method="kv.put", role="user", rate=5, burst=20),
            RateRule(method="kv.put", role="ops", rate=1, burst=3),
            RateRule(method="*", rate=50, burst=60),
        ],
        costs={"kv.put": 2},
    )
    limiter = RateLimiter(config)
    assert allowed(limiter, 5, ADA, "kv.put") == 5
    report = limiter.usage_sync(ADA, "10.0.0.1", now=1.0)
    assert report == {
        "enabled": True,
        "identity": "principal:ada",
        "default_cost": 1.0,
        "costs": {"kv.put": 2.0},
        "limits": [
            {
                "limit": "per-principal limit",
                "method": "*",
                "role": None,
                "rate": 10.0,
                "burst": 100.0,
                "tokens": 100.0,
            },  # 90 + 10 refilled in a second
            {
                "limit": "limit on kv.put for role user",
                "method": "kv.put",
                "role": "user",
                "rate": 5.0,
                "burst": 20.0,
                "tokens": 15.0,
            },
            {
                "limit": "limit on * for everyone",
                "method": "*",
                "role": None,
                "rate": 50.0,
                "burst": 60.0,
                "tokens": 60.0,
            },
        ],
    }
    assert msgspec.json.decode(msgspec.json.encode(report)) == report  # ready to send as a result
    assert limiter.usage_sync(ADA, "10.0.0.1", now=0.0)["limits"][1]["tokens"] == 10.0  # reading took nothing
    fresh = limiter.usage_sync(BOB, "10.0.0.1", now=0.0)
    assert [e["tokens"] for e in fresh["limits"]] == [100.0, 20.0, 60.0]
    assert len(limiter) == 3  # and created no buckets


def test_the_async_interface_is_the_limiter_protocol() -> None:
    async def main() -> None:
        limiter = create_limiter(RateLimitConfig(per_principal=Limit(rate=1, burst=2)))
        assert isinstance(limiter, RateLimiter) and isinstance(limiter, Limiter)
        await limiter.check(ADA, "x", "kv.get", now=0.0)
        await limiter.check(ADA, "x", "kv.get", now=0.0)
        with pytest.raises(ResourceExhausted):
            await limiter.check(ADA, "x", "kv.get", now=0.0)
        assert (await limiter.usage(ADA, "x", now=0.5))["limits"][0]["tokens"] == 0.5
        await limiter.aclose()

    asyncio.run(main())


# -- configuration ------------------------------------------------------------------------------------


def test_the_defaults() -> None:
    config = RateLimitConfig()
    assert config.enabled and config.rules == [] and config.costs == {}
    assert config.per_principal == Limit(rate=1000, burst=2000)
    assert config.per_source == Limit(rate=2000, burst=4000)
    assert config.redis_url is None and config.redis_prefix == "bastion:rl:"


def test_the_config_reads_from_a_toml_section() -> None:
    text = """
    [rate_limits]
    per_principal = { rate = 500, burst = 1000 }
    per_source = { rate = 20, burst = 40 }
    costs = { "kv.scan" = 10, "health.check" = 0 }

    [[rate_limits.rules]]
    method = "kv.put"
    role = "user"
    rate = 100
    burst = 200

    [[rate_limits.rules]]
    method = "auth.*"
    rate = 5
    burst = 10
    """
    config = msgspec.convert(tomllib.loads(text)["rate_limits"], RateLimitConfig, strict=False)
    assert config.per_principal == Limit(rate=500.0, burst=1000.0)
    assert config.rules == [
        RateRule(method="kv.put", role="user", rate=100.0, burst=200.0),
        RateRule(method="auth.*", role=None, rate=5.0, burst=10.0),
    ]
    assert config.costs == {"kv.scan": 10.0, "health.check": 0.0}
    no_base = msgspec.convert({"per_source": None}, RateLimitConfig)
    assert no_base.per_source is None


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(msgspec.ValidationError, match="bogus"):
        msgspec.convert({"bogus": 1}, RateLimitConfig)
    with pytest.raises(msgspec.ValidationError, match="per_method"):
        msgspec.convert({"rules": [{"method": "*", "rate": 1, "burst": 1, "per_method": 1}]}, RateLimitConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"rules": [{"method": "*", "rate": 1}]}, RateLimitConfig)  # burst is required


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"per_principal": {"rate": 0, "burst": 10}}, r"rate_limits\.per_principal: rate must be a positive"),
        ({"per_source": {"rate": 1, "burst": -1}}, r"rate_limits\.per_source: burst must be a positive"),
        ({"per_source": {"rate": math.inf, "burst": 1}}, r"per_source: rate must be a positive"),
        ({"per_source": {"rate": math.nan, "burst": 1}}, r"per_source: rate must be a positive"),
        (
            {"rules": [{"method": "kv.put", "role": "user", "rate": 1, "burst": 0}]},
            r"rate_limits\.rules\[0\] \('kv\.put', role 'user'\): burst must be a positive",
        ),
        ({"rules": [{"method": "", "rate": 1, "burst": 1}]}, r"rules\[0\]\.method must be a method name"),
        ({"rules": [{"method": "kv put", "rate": 1, "burst": 1}]}, r"rules\[0\]\.method must be a method name"),
        ({"rules": [{"method": "*", "role": "", "rate": 1, "burst": 1}]}, r"role must be a non-empty name"),
        (
            {
                "rules": [
                    {"method": "kv.*", "role": "u", "rate": 1, "burst": 1},
                    {"method": "kv.*", "role": "u", "rate": 2, "burst": 2},
                ]
            },
            r"rules\[1\] .*already listed",
        ),
        ({"costs": {"kv.scan": -1}}, r"costs\['kv\.scan'\] must be a number >= 0"),
        ({"costs": {"": 1}}, r"costs key '' must be a method name"),
        (
            {"per_principal": {"rate": 1, "burst": 5}, "costs": {"kv.scan": 6}},
            r"costs\['kv\.scan'\] = 6 exceeds rate_limits\.per_principal\.burst = 5",
        ),
        (
            {"rules": [{"method": "kv.*", "role": "user", "rate": 1, "burst": 5}], "costs": {"kv.scan": 6}},
            r"costs\['kv\.scan'\] = 6 exceeds the burst 5 of rate_limits\.rules\[0\]",
        ),
        (
            {"per_principal": {"rate": 100, "burst": 0.5}},
            r"per_principal: burst 0\.5 is below the default cost 1",
        ),
        (
            {"rules": [{"method": "kv.put", "rate": 10, "burst": 0.5}]},
            r"rules\[0\] \('kv\.put', role None\): burst 0\.5 is below the default cost 1",
        ),
        ({"ipv6_prefix": 0}, r"ipv6_prefix must be 1\.\.128"),
        ({"max_tracked": 10}, r"max_tracked must be at least"),
        ({"redis_url": "http://x"}, r"redis_url must start with redis://"),
        ({"redis_prefix": ""}, r"redis_prefix must not be empty"),
        ({"redis_timeout": 0}, r"redis_timeout must be a positive"),
    ],
)
def test_invalid_configurations_are_usage_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        msgspec.convert(data, RateLimitConfig)


def test_a_cost_above_the_anonymous_burst_is_allowed_but_never_passes_anonymously() -> None:
    config = RateLimitConfig(per_source=Limit(rate=1, burst=3), costs={"kv.scan": 4})
    limiter = RateLimiter(config)
    with pytest.raises(ResourceExhausted) as info:
        limiter.check_sync(ANONYMOUS, "192.0.2.1", "kv.scan", now=0.0)
    assert info.value.retry_after is None
    assert allowed(limiter, 1, ADA, "kv.scan") == 1


def test_a_burst_below_one_is_fine_when_the_calls_it_charges_cost_less() -> None:
    """Before, a burst below the default cost was accepted and every call it charged was refused for
    ever (an explicit cost of 1 was already a usage error); with costs to match it is a valid choice."""
    config = RateLimitConfig(per_principal=Limit(rate=1, burst=0.5), costs={"*": 0.25})
    assert allowed(RateLimiter(config), 5, ADA, "kv.get") == 2
    rules = [RateRule(method="kv.put", rate=1, burst=0.5)]
    config = RateLimitConfig(per_principal=None, rules=rules, costs={"kv.*": 0.5})
    assert allowed(RateLimiter(config), 5, ADA, "kv.put") == 1


def test_a_cost_above_a_superseded_rules_burst_is_fine() -> None:
    rules = [
        RateRule(method="kv.*", role="user", rate=1, burst=5),
        RateRule(method="kv.scan", role="user", rate=1, burst=50),
    ]
    config = RateLimitConfig(rules=rules, costs={"kv.scan": 20})  # kv.scan is charged to its own rule only
    assert allowed(RateLimiter(config), 5, ADA, "kv.scan") == 2


def test_what_a_connections_calls_charge_is_forgotten_when_it_closes() -> None:
    """The limiter keeps what each principal object's calls charge (a session keeps one); that entry
    goes with the session, so the cache holds the open connections' and not every one ever made."""
    service = Service("t")

    @service.method
    async def ping() -> int:
        return 1

    async def main() -> None:
        limiter = RateLimiter()
        async with MemoryServer(service, limiter=limiter) as memory:
            clients = [memory.client(principal=Principal(f"u{n}", frozenset({"user"}))) for n in range(5)]
            for client in clients:
                assert await client.t.ping() == 1
            assert len(limiter._known) == 5
            for client in clients[:3]:
                await client.close()
            deadline = asyncio.get_running_loop().time() + 5
            while len(limiter._known) != 2:
                assert asyncio.get_running_loop().time() < deadline, f"{len(limiter._known)} entries kept"
                await asyncio.sleep(0.01)
            assert await clients[3].t.ping() == 1  # the open ones are still charged
            with pytest.raises(ResourceExhausted):
                for _ in range(3000):  # the default per-principal burst is 2,000
                    await clients[4].t.ping()

    asyncio.run(main())
