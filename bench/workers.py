"""Throughput of ``bastion serve --workers 2`` vs one worker, on a handler burning ~1 ms of CPU.

    .venv/bin/python bench/workers.py [--workers 1,2] [--connections 16] [--depth 4]
                                      [--spin-ms 1.0] [--duration 5] [--warmup 1] [--json out.json]

For each worker count, a real ``bastion serve --workers N`` runs (as a
subprocess, plaintext on 127.0.0.1, rate limits off so the per-principal
default of 1000 calls/s does not cap the point) hosting ``bench.spin(ms)``,
a handler that busy-waits ``ms`` milliseconds on its event loop thread (the
same as the test suite's ``demo.spin``), and ``bench.pid()``.

The load generator is this process: one uvloop event loop, ``--connections``
``bastion.Client`` connections with ``--depth`` calls outstanding on each (a
closed loop), so both workers always have work queued. It is kept as light
as it can be (no TLS, tiny arguments, no per-call bookkeeping but a counter),
but it shares the machine's cores with the server: its own CPU time is
reported, and on a 2-core machine it takes its share from the workers. The
kernel spreads the connections over the workers (SO_REUSEPORT); the number
of connections each worker got is reported too.

Result: calls/s per point, server and client CPU seconds per second, and the
ratio of the last point to the first (the issue's target for 2 workers vs 1
on 2 cores: at least 1.6x). A micro-benchmark of one rate-limit check with
the in-memory limiter vs the shared one (``SharedRateLimiter``) follows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STARTUP_DEADLINE = 30.0
_LISTENING = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+) ")

SERVICE = """
import os
import time

from bastion import Service

service = Service("bench", doc="The workers benchmark's handlers.")


@service.method
async def spin(ms: float) -> float:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return ms


@service.method
async def pid() -> int:
    return os.getpid()
"""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class _Server:
    def __init__(self, workers: int, directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "bench_service.py").write_text(SERVICE)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env.update({"BASTION_RATE_LIMITS__ENABLED": "false", "BASTION_LOG_LEVEL": "warning"})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "--insecure", "--port", "0", "--data-dir", "data",
             "--service", "bench_service:service", "--workers", str(workers)],
            cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        deadline = time.monotonic() + STARTUP_DEADLINE
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise SystemExit(f"bastion serve --workers {workers} exited before listening")
            match = _LISTENING.search(line)
            if match:
                self.address = f"{match['host']}:{match['port']}"
                break
        else:
            raise SystemExit("bastion serve did not start in time")
        self.token = (directory / "data" / "admin.token").read_text().strip()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _load(server: _Server, args: argparse.Namespace) -> dict[str, Any]:
    from bastion import Client

    clients = [
        Client(server.address, token=server.token, timeout=30, retry=None, insecure=True)
        for _ in range(args.connections)
    ]
    for client in clients:
        await client.connect()
    spread: dict[int, int] = {}
    for client in clients:
        pid = await client.call("bench.pid")
        spread[pid] = spread.get(pid, 0) + 1
    done = 0
    running = True

    async def loop(client: Client) -> None:
        nonlocal done
        while running:
            await client.call("bench.spin", ms=args.spin_ms)
            done += 1

    tasks = [asyncio.create_task(loop(c)) for c in clients for _ in range(args.depth)]
    await asyncio.sleep(args.warmup)
    start_calls, start_time = done, time.perf_counter()
    start_server_cpu = _cpu_seconds(server.process.pid)
    start_client_cpu = _own_cpu()
    await asyncio.sleep(args.duration)
    calls, elapsed = done - start_calls, time.perf_counter() - start_time
    server_cpu = _cpu_seconds(server.process.pid) - start_server_cpu
    client_cpu = _own_cpu() - start_client_cpu
    running = False
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.close()
    return {
        "calls_per_s": calls / elapsed,
        "server_cpu_per_s": server_cpu / elapsed,
        "client_cpu_per_s": client_cpu / elapsed,
        "connections_per_worker": sorted(spread.values(), reverse=True),
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _limiter_check_cost(n: int = 200_000) -> dict[str, float]:
    """Microseconds per rate-limit check: in-memory vs shared table (two buckets charged per call)."""
    from bastion.security.principal import Principal
    from bastion.security.ratelimit import Limit, RateLimitConfig, RateLimiter, RateRule
    from bastion.security.ratelimit_shared import SharedRateLimiter, SharedTable

    config = RateLimitConfig(
        per_principal=Limit(rate=1e9, burst=1e9), rules=[RateRule(method="bench.*", role="user", rate=1e9, burst=1e9)]
    )
    table = SharedTable.create(config.max_tracked)
    out: dict[str, float] = {}
    principals = [Principal(f"user{i}", frozenset({"user"}), authenticated=True) for i in range(100)]
    for name, limiter in (("memory", RateLimiter(config)), ("shared", SharedRateLimiter(config, table))):
        start = time.perf_counter()
        for i in range(n):
            limiter.check_sync(principals[i % 100], "127.0.0.1", "bench.spin")
        out[f"{name}_us"] = (time.perf_counter() - start) / n * 1e6
    table.close()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4, help="calls outstanding per connection")
    parser.add_argument("--spin-ms", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, *, verbose: bool = False) -> dict[str, Any]:
    """One point per worker count in ``args.workers``, their ratio (last / first) and the limiter micro-bench."""
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None

    results: dict[str, Any] = {"cpus": os.cpu_count(), "points": {}}
    for count in [int(w) for w in args.workers.split(",")]:
        directory = Path(tempfile.mkdtemp(prefix="bastion-bench-workers-"))
        server = _Server(count, directory / "server")
        try:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                point = runner.run(_load(server, args))
        finally:
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)
        results["points"][count] = point
        if verbose:
            print(
                f"workers={count}: {point['calls_per_s']:8.0f} calls/s   "
                f"server CPU {point['server_cpu_per_s']:.2f} s/s   client CPU {point['client_cpu_per_s']:.2f} s/s   "
                f"connections per worker {point['connections_per_worker']}"
            )
    counts = list(results["points"])
    if len(counts) > 1:
        results["ratio"] = results["points"][counts[-1]]["calls_per_s"] / results["points"][counts[0]]["calls_per_s"]
    results["rate_limit_check"] = _limiter_check_cost()
    return results


def main() -> None:
    args = parse_args()
    print(f"{os.cpu_count()} CPUs; handler spins {args.spin_ms} ms; {args.connections} connections x {args.depth} deep")
    results = measure(args, verbose=True)
    counts = list(results["points"])
    if "ratio" in results:
        print(f"ratio workers={counts[-1]} / workers={counts[0]}: {results['ratio']:.2f}x")
    cost = results["rate_limit_check"]
    print(f"one rate-limit check (2 buckets): in memory {cost['memory_us']:.2f} us, shared {cost['shared_us']:.2f} us")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
