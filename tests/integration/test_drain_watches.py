"""A draining server ends the streams a client resumes (watches, subscriptions) at once.

Such a stream never finishes by itself: the drain used to wait out the whole
grace period for it and then cut it off, so every rolling restart with a
watcher open took the full grace period. Methods marked ``resumable`` are
ended with UNAVAILABLE as the drain begins (other calls still finish).
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

import bastion
from bastion.client.aio import Client
from tests.conftest import StartServer

GRACE = "20"  # seconds: far longer than any of these tests may take


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("kv.watch", {"prefix": "drain:"}),
        ("messages.subscribe", {"pattern": "drain.>"}),
    ],
)
def test_a_draining_server_ends_open_watches_at_once(server_factory: StartServer, method: str, args: Any) -> None:
    server = server_factory(env={"BASTION_LIMITS__GRACE_PERIOD": GRACE})

    async def main() -> tuple[float, bastion.Unavailable, int | None]:
        async with Client(server.address, token=server.token, timeout=60) as client:
            events = client.stream(method, **args).__aiter__()
            assert (await anext(events))["type"] == "start"
            began = time.monotonic()
            server.signal(signal.SIGTERM)
            with pytest.raises(bastion.Unavailable) as ended:
                await anext(events)
            took = time.monotonic() - began
            return took, ended.value, ended.value.retry_after

    took, error, retry_after = asyncio.run(main())
    assert took < 5, f"the stream ended {took:.1f} s after SIGTERM (grace period {GRACE} s)"
    assert "draining" in error.message, error.message
    assert retry_after is not None
    began = time.monotonic()
    assert server.stop(timeout=15) == 0
    assert time.monotonic() - began < 5, "the server waited out its grace period"
