"""Goodput under overload: ``python bench/overload.py``.

A bastion server (its own process, pinned to CPU 0) hosts ``load.work``, a
handler with a fixed ~2 ms CPU cost. The load generator (CPU 1) first finds
the server's capacity with a closed loop, then offers an open-loop load of
2x, 5x and 10x that capacity, every call carrying a deadline, and counts
**goodput**: calls answered successfully within their deadline, per second.
Without admission control a server under 10x load answers almost nothing in
time (every call waits behind the backlog); bastion's scheduler sheds the
excess at once with a retry-after, so goodput should stay near capacity.

The server runs with ``scheduler.max_concurrency`` small (default 4): for
CPU-bound handlers the useful concurrency is the number of cores, and a small
value keeps the backlog where the scheduler can see and shed it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKEN = "bst_overload-bench-token-not-a-secret-0123456789"

SERVER = r"""
import asyncio, os, sys, time
import uvloop
from bastion import Principal, Server, Service
from bastion.security.authn import StaticTokens
from bastion.security.ratelimit import RateLimitConfig, RateLimiter
from bastion.server.scheduler import Scheduler, SchedulerConfig

if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
    os.sched_setaffinity(0, {0})
svc = Service("load")

@svc.method
async def work(ms: float = 2.0) -> float:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return ms

async def main():
    server = Server(
        [svc],
        authenticator=StaticTokens({sys.argv[1]: Principal("load")}),
        limiter=RateLimiter(RateLimitConfig(per_principal=None)),
        scheduler=Scheduler(SchedulerConfig(max_concurrency=int(sys.argv[2]))),
    )
    await server.start("127.0.0.1", 0)
    print("PORT", server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.shutdown(1)

uvloop.run(main())
"""


async def closed_loop(client, seconds: float, concurrency: int) -> float:  # type: ignore[no-untyped-def]
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await client.invoke("load.work", {}, timeout=5)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return done / (time.perf_counter() - started)


async def open_loop(client, rate: float, seconds: float, deadline: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import bastion

    counts = {"ok": 0, "late": 0, "shed": 0, "error": 0}

    async def one() -> None:
        try:
            await client.invoke("load.work", {}, timeout=deadline)
            counts["ok"] += 1
        except bastion.DeadlineExceeded:
            counts["late"] += 1
        except (bastion.ResourceExhausted, bastion.Unavailable):
            counts["shed"] += 1
        except bastion.BastionError:
            counts["error"] += 1

    tasks = []
    started = time.perf_counter()
    interval = 1 / rate
    sent = 0
    while (now := time.perf_counter()) - started < seconds:
        due = int((now - started) / interval) + 1
        for _ in range(due - sent):
            tasks.append(asyncio.ensure_future(one()))
        sent = due
        await asyncio.sleep(0.002)
    await asyncio.gather(*tasks)
    elapsed = seconds
    return {
        "offered_per_s": sent / elapsed,
        "goodput_per_s": counts["ok"] / elapsed,
        **{k: float(v) for k, v in counts.items()},
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    import bastion

    proc = subprocess.Popen(  # noqa: ASYNC220  # once, before any load
        [sys.executable, "-c", SERVER, TOKEN, str(args.slots)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT"):
            raise RuntimeError(f"server did not start: {line!r}")
        port = int(line.split()[1])
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})
        clients = [bastion.Client(f"127.0.0.1:{port}", token=TOKEN, insecure=True, retry=None) for _ in range(4)]
        for c in clients:
            await c.connect()
        await closed_loop(clients[0], 1.0, 16)  # warm-up
        capacity = await closed_loop(clients[0], args.duration, 16)
        rows: list[dict[str, float]] = []
        for factor in args.factors:
            per_client = capacity * factor / len(clients)
            results = await asyncio.gather(*[open_loop(c, per_client, args.duration, args.deadline) for c in clients])
            row = {key: sum(r[key] for r in results) for key in results[0]}
            row["factor"] = factor
            row["goodput_vs_peak"] = row["goodput_per_s"] / capacity
            rows.append(row)
            await asyncio.sleep(1)  # let the server drain between points
        for c in clients:
            await c.close()
        return {"capacity_per_s": capacity, "rows": rows}
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=float, nargs="+", default=[2, 5, 10])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    parser.add_argument("--deadline", type=float, default=1.0, help="each call's timeout, seconds")
    parser.add_argument("--slots", type=int, default=4, help="scheduler.max_concurrency of the server")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(run(args))
    print(f"2 ms CPU handler; capacity (closed loop, 16 callers): {result['capacity_per_s']:.0f} calls/s")
    print(f"{'offered':>8} {'offered/s':>10} {'goodput/s':>10} {'vs peak':>8} {'shed':>8} {'late':>8}")
    for row in result["rows"]:  # type: ignore[attr-defined]
        print(
            f"{row['factor']:>7.0f}x {row['offered_per_s']:>10.0f} {row['goodput_per_s']:>10.0f} "
            f"{row['goodput_vs_peak']:>7.0%} {row['shed']:>8.0f} {row['late']:>8.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
