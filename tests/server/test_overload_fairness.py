"""Under overload the calls refused are the heavy caller's, not a light caller's (a real server).

One principal floods a two-slot server with a hundred calls at a time, as
fast as it is answered or refused; another makes one call at a time, well
within a fair share of the slots. The interactive level is overloaded
(CoDel dropping) the whole time, and a newcomer to it is refused once the
level's queue holds what it starts in ``codel_target``. That cap was
level-wide: the flood kept the queue at it, so the light caller's calls
found it full and were refused UNAVAILABLE about as often as the flood's --
most of them. Now a newcomer to a full dropping level takes the place of
the newest call of a caller with at least two more queued (as a full level
already did), so the flood's own calls make room.
"""

from __future__ import annotations

import asyncio

import pytest

import bastion
from bastion import Principal, Server, Service
from bastion.security.authn import StaticTokens
from bastion.server.scheduler import Scheduler, SchedulerConfig

#: Timing-sensitive: runs alone under ``pytest -n`` (the "exclusive" marker, tests/conftest.py).
pytestmark = pytest.mark.exclusive

FLOODER = "bst_flooder-token-0123456789abcdef0"
LIGHT = "bst_lightuser-token-0123456789abcdef"
FLOOD = 100  # the flooder's calls in flight at any time
LIGHT_CALLS = 40


def test_a_light_caller_is_not_refused_for_a_heavy_callers_flood() -> None:
    async def main() -> None:
        svc = Service("fair")

        @svc.method()
        async def work() -> int:
            await asyncio.sleep(0.01)
            return 1

        tokens = StaticTokens({FLOODER: Principal("flooder", frozenset()), LIGHT: Principal("light", frozenset())})
        server = Server(
            [svc], authenticator=tokens, scheduler=Scheduler(SchedulerConfig(max_concurrency=2, control_reserve=0))
        )
        await server.start("127.0.0.1", 0)
        address = f"127.0.0.1:{server.port}"
        stats = server.scheduler.stats
        light_done = asyncio.Event()
        refused = {"flooder": 0, "light": 0}

        async def flood(client: bastion.Client) -> None:
            while not light_done.is_set():
                try:
                    await client.call("fair.work")
                except bastion.Unavailable:
                    refused["flooder"] += 1
                    await asyncio.sleep(0.001)

        async def light(client: bastion.Client) -> None:
            deadline = asyncio.get_running_loop().time() + 10
            while not stats()["overloaded_interactive"]:  # the flood has the level shedding
                assert asyncio.get_running_loop().time() < deadline, "the flood never overloaded the level"
                await asyncio.sleep(0.005)
            try:
                for _ in range(LIGHT_CALLS):
                    try:
                        await client.call("fair.work")
                    except bastion.Unavailable:
                        refused["light"] += 1
                    await asyncio.sleep(0.01)
            finally:
                light_done.set()

        try:
            async with asyncio.timeout(60):
                async with (
                    bastion.Client(address, token=FLOODER, insecure=True, timeout=30, retry=None) as heavy,
                    bastion.Client(address, token=LIGHT, insecure=True, timeout=30, retry=None) as lightweight,
                ):
                    await asyncio.gather(*(flood(heavy) for _ in range(FLOOD)), light(lightweight))
        finally:
            await server.shutdown(grace=1)
        assert refused["flooder"] > 100  # the server was overloaded, and shed the flood
        assert refused["light"] <= LIGHT_CALLS // 10, refused  # before: most of the light caller's calls

    asyncio.run(main())
