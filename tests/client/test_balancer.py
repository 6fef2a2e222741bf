"""The balancer's pure parts: the circuit breaker, power-of-two-choices, address parsing (clock injected)."""

from __future__ import annotations

import itertools

import pytest

from bastion.client.balancer import (
    Balancer,
    BreakerState,
    CircuitBreaker,
    Endpoint,
    expand_endpoints,
    parse_endpoints,
)
from bastion.exceptions import UsageError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **kw: float) -> CircuitBreaker:
    return CircuitBreaker(clock=clock, random=lambda: 1.0, **kw)  # type: ignore[arg-type]


def test_breaker_opens_after_consecutive_failures_and_half_opens_after_backoff() -> None:
    clock = Clock()
    b = breaker(clock, failure_threshold=3, reset_timeout=1.0, max_reset_timeout=4.0)
    b.on_failure()
    b.on_failure()
    b.on_success()  # resets the run
    b.on_failure()
    b.on_failure()
    assert b.state is BreakerState.CLOSED and b.available()
    b.on_failure()
    assert b.state is BreakerState.OPEN and not b.available()
    clock.now += 0.99
    assert b.state is BreakerState.OPEN
    clock.now += 0.02
    assert b.state is BreakerState.HALF_OPEN and b.available()
    assert b.begin_trial() and not b.available() and not b.begin_trial()  # one trial at a time
    b.on_failure()  # the trial failed: open again, for twice as long
    assert b.state is BreakerState.OPEN
    clock.now += 1.5
    assert b.state is BreakerState.OPEN
    clock.now += 0.6
    assert b.state is BreakerState.HALF_OPEN
    assert b.begin_trial()
    b.on_success()
    assert b.state is BreakerState.CLOSED and b.available()


def test_breaker_backoff_is_capped_and_jittered() -> None:
    clock = Clock()
    b = CircuitBreaker(reset_timeout=1.0, max_reset_timeout=4.0, clock=clock, random=lambda: 0.0)
    waits = []
    for _ in range(5):
        b.trip()
        assert b.open_until is not None
        waits.append(b.open_until - clock.now)
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0]  # half of 1, 2, 4, 4, 4 (jitter floor 50%)
    with pytest.raises(UsageError):
        CircuitBreaker(failure_threshold=0)


def endpoints(n: int, clock: Clock) -> list[Endpoint]:
    return [Endpoint("127.0.0.1", 7400 + i, breaker(clock)) for i in range(n)]


def test_power_of_two_choices_takes_the_less_loaded_of_two() -> None:
    clock = Clock()
    eps = endpoints(3, clock)
    draws = itertools.cycle([0.0, 0.0])  # i = 0, j = 0 -> 1: endpoints 0 and 1
    balancer = Balancer(eps, random=lambda: next(draws))
    eps[0].outstanding = 5
    eps[1].outstanding = 2
    assert balancer.pick() is eps[1]
    eps[1].outstanding = 9
    assert balancer.pick() is eps[0]
    eps[1].outstanding = 5
    assert balancer.pick() is eps[0]  # a tie keeps the first draw


def test_pick_spreads_load_and_never_draws_the_same_twice() -> None:
    import random

    rng = random.Random(7)
    clock = Clock()
    eps = endpoints(3, clock)
    balancer = Balancer(eps, random=rng.random)
    for _ in range(300):
        balancer.pick().outstanding += 1
    counts = sorted(e.outstanding for e in eps)
    assert counts[-1] - counts[0] <= 2  # least-loaded of two keeps them level


def test_pick_skips_open_breakers_and_excluded_endpoints() -> None:
    clock = Clock()
    eps = endpoints(3, clock)
    balancer = Balancer(eps, random=lambda: 0.0)
    eps[0].breaker.trip()
    for _ in range(5):
        assert balancer.pick() is not eps[0]
    assert balancer.pick(exclude=[eps[1]]) is eps[2]
    # Everything else excluded or open: the open one is still picked rather than nothing.
    assert balancer.pick(exclude=[eps[1], eps[2]]) is eps[0]
    eps[1].breaker.trip()
    eps[2].breaker.trip()
    clock.now += 0.1
    soonest = min(eps, key=lambda e: e.breaker.open_until or 0.0)
    assert balancer.pick() is soonest
    clock.now += 100
    assert all(e.breaker.state is BreakerState.HALF_OPEN for e in eps)
    assert balancer.pick() in eps


def test_parse_endpoints() -> None:
    assert parse_endpoints("a:1") == ([("a", 1)], False)
    assert parse_endpoints("a:1, b:2") == ([("a", 1), ("b", 2)], True)
    assert parse_endpoints(["a:1", "[::1]:3"]) == ([("a", 1), ("::1", 3)], True)
    assert parse_endpoints("dns:///svc:7400") == ([("svc", 7400)], True)
    with pytest.raises(UsageError):
        parse_endpoints(" , ")


@pytest.mark.parametrize("address", ["[::1", "[::1]7400", "[::1]x:7400", "[]:7400"])
def test_a_bracketed_address_that_does_not_close_before_its_port_is_refused(address: str) -> None:
    """``[::1`` (its bracket never closed) and ``[::1]7400`` (no colon before the port) were taken for
    ``::1`` on the default port -- a typo'd port silently became 7400 -- and ``[]`` for 127.0.0.1."""
    with pytest.raises(UsageError, match="bad address"):
        parse_endpoints(address)
    assert parse_endpoints("[::1]") == ([("::1", 7400)], False)


def test_expand_resolves_names_to_every_address_and_keeps_the_name_for_tls() -> None:
    clock = Clock()
    eps = expand_endpoints(
        [("svc", 7400), ("10.0.0.9", 7400), ("svc", 7400)],
        lambda host, port: ["10.0.0.1", "10.0.0.2"],
        lambda: breaker(clock),
    )
    assert [(e.host, e.port, e.server_hostname) for e in eps] == [
        ("10.0.0.1", 7400, "svc"),
        ("10.0.0.2", 7400, "svc"),
        ("10.0.0.9", 7400, None),
    ]
    assert eps[0].address == "10.0.0.1:7400"
    assert Endpoint("::1", 1, breaker(clock)).address == "[::1]:1"
