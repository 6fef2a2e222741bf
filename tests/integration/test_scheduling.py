"""Priority scheduling on a real server: control calls keep answering while
batch work saturates it, and no queued call runs after its deadline."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

import bastion
from bastion import Client
from tests.support.server import ServerProcess

#: Timing assertions, or effects on the whole PostgreSQL server: runs alone under
#: ``pytest -n`` (the "exclusive" marker, tests/conftest.py).
pytestmark = pytest.mark.exclusive

SLOTS = "16"


def test_health_answers_fast_while_batch_work_saturates_the_server(server_factory) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = server_factory(env={"BASTION_SCHEDULER__MAX_CONCURRENCY": SLOTS})

    async def main() -> tuple[list[float], dict[str, int], int]:
        outcomes = {"ok": 0, "deadline": 0, "shed": 0}
        health_latencies: list[float] = []
        async with (
            Client(server.address, token_file=str(server.token_file), timeout=30, retry=None) as worker,
            Client(server.address, timeout=5, retry=None) as monitor,
        ):
            stop = asyncio.Event()
            saturated = asyncio.Event()  # set at the first refusal or expired deadline

            async def flood(offset: int) -> None:
                tag = offset
                while not stop.is_set():
                    batch = [
                        worker.invoke("demo.batch_work", {"seconds": 0.05, "tag": tag + i}, timeout=0.5)
                        for i in range(64)
                    ]
                    tag += 64 * 8
                    for result in await asyncio.gather(*batch, return_exceptions=True):
                        if isinstance(result, bastion.DeadlineExceeded):
                            outcomes["deadline"] += 1
                            saturated.set()
                        elif isinstance(result, bastion.Unavailable | bastion.ResourceExhausted):
                            outcomes["shed"] += 1
                            saturated.set()
                        elif isinstance(result, BaseException):
                            raise result
                        else:
                            outcomes["ok"] += 1

            floods = [asyncio.ensure_future(flood(n * 64)) for n in range(8)]
            await asyncio.wait_for(saturated.wait(), timeout=20)
            for _ in range(500):
                started = time.perf_counter()
                assert (await monitor.admin.health())["status"] == "ok"
                health_latencies.append(time.perf_counter() - started)
            stop.set()
            await asyncio.gather(*floods)
            stats = await worker.admin.stats()
        return health_latencies, outcomes, int(stats["scheduler_queued"])

    latencies, outcomes, _ = asyncio.run(main())
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.100, f"health p99 {p99 * 1000:.1f} ms under saturation"
    assert outcomes["ok"] > 0 and outcomes["deadline"] + outcomes["shed"] > 0, outcomes
    late = sorted(p.name for p in server.marker_dir.glob("late-*"))
    assert not late, f"calls ran after their deadline: {late[:5]}"
