"""The login throttle in Redis: failures whose answers were lost, and the lockouts they decide (settling).

Replica ``a`` talks to Redis through a relay (``through_relay``) that can hold back or drop its answers;
``b`` talks to Redis directly; both share one store. Needs BASTION_TEST_REDIS_URL, as test_throttle_redis.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bastion.security.throttle import LoginThrottle
from tests.security.test_throttle_redis import Clock, needs_redis, through_relay, until


@needs_redis
def test_a_bad_token_failure_whose_answer_was_lost_is_not_charged_twice(tmp_path: Path) -> None:
    async def body(clock: Clock, client: Any, prefix: str, relay: Any, a: LoginThrottle, b: LoginThrottle) -> None:
        relay.mode = "stall"  # the failure runs in Redis (1 of the source's 3 tokens spent), its answer lost
        assert await a.failed(None, "10.0.0.1") is False
        relay.mode = "pass"
        assert a._redis is not None
        assert not a._redis._unsettled, "a bad token's failure (not idempotent) is kept to be run again"

        async def answered() -> bool:
            await a.check("zed", "10.0.0.9")
            assert a._redis is not None
            return a._redis._gate.healthy

        assert await until(answered)
        tokens = await client.hget(f"{prefix}{{login}}:s:10.0.0.1", "t")
        assert float(tokens) == 2.0  # charged once in Redis

    through_relay(tmp_path, body, timeout=0.3, burst=3)
