"""The retry policy, budget and idempotency cache (bastion/client/policy.py): pure, with a fake clock."""

import pytest

from bastion import (
    ConnectionClosed,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Status,
    Unavailable,
    Unimplemented,
    UsageError,
)
from bastion.client.policy import (
    Attempts,
    IdempotentMethods,
    NotStarted,
    RetryBudget,
    RetryPolicy,
    is_replayable,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def policy(**kwargs: object) -> RetryPolicy:
    return RetryPolicy(**kwargs)  # type: ignore[arg-type]


# -- backoff ---------------------------------------------------------------------------------


def test_the_backoff_ceiling_grows_exponentially_up_to_max_delay() -> None:
    top = RetryPolicy(base_delay=0.05, max_delay=2.0, random=lambda: 1.0)
    assert [round(top.backoff(n), 6) for n in range(1, 9)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert top.backoff(10_000) == 2.0  # no overflow however many attempts
    bottom = RetryPolicy(random=lambda: 0.0)
    assert all(bottom.backoff(n) == 0.0 for n in range(1, 10))  # full jitter reaches zero


def test_jittered_delays_stay_within_their_bounds_and_spread_out() -> None:
    import random

    source = random.Random(7)
    p = RetryPolicy(base_delay=0.05, max_delay=2.0, multiplier=2.0, random=source.random)
    for attempt in range(1, 8):
        ceiling = min(2.0, 0.05 * 2 ** (attempt - 1))
        samples = [p.backoff(attempt) for _ in range(500)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) - min(samples) > ceiling * 0.8  # full jitter, not a fixed step
        assert abs(sum(samples) / len(samples) - ceiling / 2) < ceiling * 0.1


def test_retry_after_is_a_floor_and_one_beyond_max_delay_is_not_waited_for() -> None:
    p = RetryPolicy(base_delay=0.05, max_delay=2.0, random=lambda: 0.5)
    assert p.delay(1) == 0.025
    assert p.delay(1, retry_after=0.3) == 0.3  # the server's floor wins over a shorter backoff
    assert p.delay(6, retry_after=0.3) == 0.8  # a longer backoff stands
    assert p.delay(1, retry_after=2.0) == 2.0
    assert p.delay(1, retry_after=2.5) is None  # longer than we would wait: raise, let the caller decide
    assert p.delay(1, retry_after=0) == 0.025


def test_next_delay_gives_up_on_non_retryable_statuses_non_idempotent_calls_and_exhausted_attempts() -> None:
    p = RetryPolicy(max_attempts=3, random=lambda: 1.0)
    assert p.next_delay(Unavailable("x"), 1, idempotent=True) == 0.05
    assert p.next_delay(ResourceExhausted("x"), 2, idempotent=True) == 0.1
    assert p.next_delay(Unavailable("x"), 3, idempotent=True) is None  # 3 attempts made
    assert p.next_delay(Unavailable("x"), 1, idempotent=False) is None
    for error in (InvalidArgument("x"), DeadlineExceeded("x"), PermissionDenied("x"), ConnectionClosed("x")):
        assert p.next_delay(error, 1, idempotent=True) is None
    assert not p.may_retry(InvalidArgument("x")) and not p.may_retry(ValueError("x"))
    assert p.may_retry(Unavailable("x")) and p.may_retry(ResourceExhausted("x"))
    custom = RetryPolicy(retryable={Status.ABORTED}, random=lambda: 1.0)
    assert custom.next_delay(Unavailable("x"), 1, idempotent=True) is None
    assert custom.may_retry(NotStarted("x"))  # never-started calls are not a status choice


def test_no_retry_is_started_that_the_deadline_would_cut_short() -> None:
    clock = FakeClock()
    p = RetryPolicy(random=lambda: 1.0, clock=clock)
    error = Unavailable("busy", retry_after=0.5)
    assert p.next_delay(error, 1, idempotent=True, deadline=clock.now + 0.6) == 0.5
    assert p.next_delay(error, 1, idempotent=True, deadline=clock.now + 0.5) is None
    assert p.next_delay(error, 1, idempotent=True, deadline=clock.now + 0.2) is None
    assert p.next_delay(Unavailable("busy"), 1, idempotent=True, deadline=clock.now + 0.2) == 0.05


def test_policies_refuse_nonsense() -> None:
    for bad in ({"max_attempts": 0}, {"base_delay": -1.0}, {"base_delay": 3.0, "max_delay": 2.0}, {"multiplier": 0.5}):
        with pytest.raises(UsageError):
            policy(**bad)
    with pytest.raises(UsageError):
        RetryBudget(capacity=0.5)
    with pytest.raises(UsageError):
        RetryBudget(ratio=-0.1)


# -- budget ----------------------------------------------------------------------------------


def spend(budget: RetryBudget) -> int:
    """Take every retry the budget allows now."""
    taken = 0
    while budget.can_retry():
        budget.on_retry()
        taken += 1
    return taken


def test_the_budget_caps_retries_at_the_configured_share_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, capacity=5.0, clock=clock)
    assert spend(budget) == 5  # it starts full
    retries = 0
    for _ in range(1000):  # a storm: every request fails and wants a retry
        budget.on_request()
        if budget.can_retry():
            budget.on_retry()
            retries += 1
    assert retries == 200  # 20% of requests, not one more
    assert not budget.can_retry()


def test_the_budget_refills_at_its_floor_per_second_up_to_capacity() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=2.0, capacity=10.0, clock=clock)
    assert spend(budget) == 10
    clock.advance(1.0)
    assert spend(budget) == 2  # a client with no traffic still gets its floor
    clock.advance(3600.0)
    assert budget.balance == 10.0  # never more than capacity, however long it was idle
    for _ in range(10_000):
        budget.on_request()
    assert budget.balance == 10.0  # nor however many calls succeeded


def test_can_retry_does_not_spend_and_on_request_is_only_a_counter() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, capacity=1.0, clock=clock)
    assert budget.can_retry() and budget.can_retry()
    budget.on_retry()
    assert not budget.can_retry()
    budget.on_request()
    assert not budget.can_retry()  # half a token
    budget.on_request()
    assert budget.can_retry()


def test_a_policy_gives_each_client_its_own_budget_unless_one_is_shared() -> None:
    p = RetryPolicy(budget_ratio=0.1, budget_min_per_second=0.5)
    one, two = p.new_budget(), p.new_budget()
    assert one is not two and (one.ratio, one.min_per_second) == (0.1, 0.5)
    shared = RetryBudget()
    assert RetryPolicy(budget=shared).new_budget() is shared


# -- one call's attempts ---------------------------------------------------------------------


def test_attempts_count_up_to_max_attempts_and_draw_on_the_budget() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, capacity=3.0, clock=clock)
    p = RetryPolicy(max_attempts=3, random=lambda: 1.0, clock=clock)
    attempts = p.attempts(budget, deadline=None, idempotent=True)
    assert [attempts.next_delay(Unavailable("x")) for _ in range(3)] == [0.05, 0.1, None]
    assert attempts.attempt == 3 and budget.balance == 1.0
    other = p.attempts(budget, deadline=None, idempotent=True)
    assert other.next_delay(Unavailable("x")) == 0.05
    assert other.next_delay(Unavailable("x")) is None  # the budget is spent, though attempts remain


def test_unknown_idempotency_is_asked_for_only_when_it_decides_something() -> None:
    p = RetryPolicy(random=lambda: 1.0)
    attempts = p.attempts(None, deadline=None, idempotent=None)
    assert attempts.needs_idempotency(Unavailable("x"))
    assert not attempts.needs_idempotency(InvalidArgument("x"))
    assert not attempts.needs_idempotency(NotStarted("x"))  # replayed regardless
    assert attempts.next_delay(Unavailable("x")) is None  # unknown counts as not idempotent
    assert not p.attempts(None, deadline=None, idempotent=False).needs_idempotency(Unavailable("x"))


def test_a_call_that_never_started_is_replayed_once_at_once_whatever_the_method() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, capacity=1.0, clock=clock)
    p = RetryPolicy(random=lambda: 1.0, clock=clock)
    attempts = Attempts(p, budget, deadline=None, idempotent=False)
    assert attempts.next_delay(NotStarted("goaway", retry_after=0)) == 0.0
    assert attempts.next_delay(NotStarted("goaway", retry_after=0)) is None  # once
    assert budget.balance == 1.0 and attempts.attempt == 1  # not a retry: no budget, no attempt spent
    idem = Attempts(p, budget, deadline=None, idempotent=True)
    assert idem.next_delay(NotStarted("goaway", retry_after=0)) == 0.0
    assert idem.next_delay(NotStarted("goaway", retry_after=0)) == 0.05  # then an ordinary retry
    late = Attempts(p, None, deadline=clock.now, idempotent=False)
    assert late.next_delay(NotStarted("goaway")) is None  # not past the deadline either


def test_remaining_time_is_measured_on_the_policy_clock() -> None:
    clock = FakeClock()
    p = RetryPolicy(clock=clock)
    attempts = p.attempts(None, deadline=clock.now + 1.0, idempotent=True)
    clock.advance(0.25)
    assert attempts.remaining() == 0.75
    clock.advance(5)
    assert attempts.remaining() == 0.001
    assert p.attempts(None, deadline=None, idempotent=True).remaining() is None


def test_only_sequences_can_be_sent_again() -> None:
    assert is_replayable(None) and is_replayable([1]) and is_replayable((1,)) and is_replayable(range(3))
    assert not is_replayable(iter([1])) and not is_replayable(x for x in [1])


# -- what the server says is idempotent ----------------------------------------------------


LISTING = [
    {"name": "admin", "methods": [{"name": "admin.health", "idempotent": True}]},
    {"name": "kv", "methods": [{"name": "kv.get", "idempotent": True}, {"name": "kv.put", "idempotent": False}]},
]


def test_the_listing_names_the_idempotent_methods() -> None:
    methods = IdempotentMethods()
    assert methods.lookup("kv.get") is None and methods.should_fetch()
    methods.learn(LISTING)
    assert methods.lookup("kv.get") is True and methods.lookup("admin.health") is True
    assert methods.lookup("kv.put") is False and methods.lookup("kv.missing") is False
    assert not methods.should_fetch()  # once per connection


@pytest.mark.parametrize(
    "listing", [None, "nope", [1, 2], [{"methods": "x"}], [{"methods": [{"name": 3, "idempotent": True}]}]]
)
def test_a_malformed_listing_means_nothing_is_idempotent(listing: object) -> None:
    methods = IdempotentMethods()
    methods.learn(listing)
    assert methods.lookup("kv.get") is False and not methods.should_fetch()
    methods = IdempotentMethods()
    methods.learn([{"methods": [{"name": "kv.get", "idempotent": "yes"}]}])  # only a real True counts
    assert methods.lookup("kv.get") is False


def test_a_refused_fetch_is_final_and_a_transient_one_is_tried_again_later() -> None:
    clock = FakeClock()
    refused = IdempotentMethods(clock=clock)
    refused.failed(Unimplemented("unknown method 'admin.methods'"))
    assert refused.lookup("kv.get") is False and not refused.should_fetch()
    for transient in (ResourceExhausted("busy"), Unavailable("down"), DeadlineExceeded("slow"), ConnectionClosed("x")):
        methods = IdempotentMethods(clock=clock, refetch_after=10.0)
        methods.failed(transient)
        assert methods.lookup("kv.get") is None and not methods.should_fetch()
        clock.advance(10.0)
        assert methods.should_fetch()
