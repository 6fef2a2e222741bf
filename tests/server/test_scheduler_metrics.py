"""The scheduler's queues as /metrics shows them: ``bastion_scheduler_queue_length`` by level.

A real server (in-process, loopback TCP) with one slot, held; calls queue at
the interactive and batch levels, and the scrape (``server_snapshot`` and
``render``, what the gateway's ``GET /metrics`` serves) must show them. The
gauge was labelled control, high, normal and low, but the scheduler's levels
are control, interactive and batch: only control's queue was ever read, and
the others showed 0 however many calls waited (admin.stats had them right).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

import bastion
from bastion import Server, Service
from bastion.observability.metrics import render, server_snapshot
from bastion.server.scheduler import Scheduler, SchedulerConfig


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def queue_lengths(server: Server) -> dict[str, float]:
    text = render(server_snapshot(server)).decode()
    lengths: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bastion_scheduler_queue_length":
                lengths[sample.labels["priority"]] = sample.value
    return lengths


def test_metrics_show_the_calls_queued_at_each_level() -> None:
    async def main() -> None:
        release = asyncio.Event()
        svc = Service("qm")

        @svc.method(public=True)
        async def hold() -> str:
            await release.wait()
            return "held"

        @svc.method(public=True)
        async def interactive() -> str:
            await asyncio.sleep(0)
            return "i"

        @svc.method(public=True, priority=-1)
        async def batch() -> str:
            await asyncio.sleep(0)
            return "b"

        config = SchedulerConfig(max_concurrency=1, control_reserve=0, codel_target=30, codel_interval=30)
        server = Server([svc], scheduler=Scheduler(config))
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(30):
                async with bastion.Client(f"127.0.0.1:{server.port}", insecure=True, timeout=10, retry=None) as client:
                    held = asyncio.ensure_future(client.call("qm.hold"))
                    stats = server.scheduler.stats
                    await until(lambda: stats()["running"] == 1, "the slot to be held")
                    calls = [asyncio.ensure_future(client.call("qm.interactive")) for _ in range(3)]
                    calls += [asyncio.ensure_future(client.call("qm.batch")) for _ in range(2)]
                    await until(lambda: stats()["queued"] == 5, "the calls to queue")
                    assert queue_lengths(server) == {"control": 0, "interactive": 3, "batch": 2}
                    release.set()
                    assert await asyncio.gather(held, *calls) == ["held", "i", "i", "i", "b", "b"]
                    assert queue_lengths(server) == {"control": 0, "interactive": 0, "batch": 0}
        finally:
            release.set()
            await server.shutdown(grace=1)

    asyncio.run(main())


def overloaded(server: Server) -> dict[str, float]:
    text = render(server_snapshot(server)).decode()
    return {
        sample.labels["priority"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "bastion_scheduler_overloaded"
    }


def test_metrics_show_which_levels_are_shedding() -> None:
    """admin.stats has said whether a level is overloaded (shedding: scheduler_overloaded_*); /metrics
    did not, so a dashboard could see calls refused as shed but not that the server was shedding now."""

    async def main() -> None:
        release = asyncio.Event()
        svc = Service("qo")

        @svc.method(public=True)
        async def hold() -> str:
            await release.wait()
            return "held"

        @svc.method(public=True)
        async def echo(value: int) -> int:
            return value

        target = 0.05
        config = SchedulerConfig(max_concurrency=1, control_reserve=0, codel_target=target, codel_interval=0.1)
        server = Server([svc], scheduler=Scheduler(config))
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(30):
                async with bastion.Client(f"127.0.0.1:{server.port}", insecure=True, timeout=10, retry=None) as client:
                    stats = server.scheduler.stats
                    assert overloaded(server) == {"interactive": 0, "batch": 0}
                    held = asyncio.ensure_future(client.call("qo.hold"))
                    await until(lambda: stats()["running"] == 1, "the slot to be held")
                    queued: list[asyncio.Future[object]] = []
                    while not stats()["overloaded_interactive"]:  # each newcomer looks at the oldest one's wait
                        queued.append(asyncio.ensure_future(client.call("qo.echo", value=len(queued))))
                        await until(lambda: stats()["submitted"] >= len(queued) + 1, "the call to reach the scheduler")
                        assert len(queued) < 1000, "the interactive level never started dropping"
                        await asyncio.sleep(target / 2)
                    assert overloaded(server) == {"interactive": 1, "batch": 0}
                    release.set()
                    await asyncio.gather(held, *queued, return_exceptions=True)
                    await until(lambda: not stats()["overloaded_interactive"], "the overload to end")
                    assert overloaded(server) == {"interactive": 0, "batch": 0}
        finally:
            release.set()
            await server.shutdown(grace=1)

    asyncio.run(main())
