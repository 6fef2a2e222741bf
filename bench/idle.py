"""Server memory per idle connection: N connections opened and left idle, RSS growth / N.

    (holder mode, started by ``hold_idle``) python bench/idle.py KIND PORT N [--tls DIR]

A holder process opens N connections to a bench server and prints
``READY <n>`` once all are up, then keeps them until its stdin closes. For
``bastion`` each connection is a public ``bastion.Client`` that completed the
bastion handshake with the bench token (an *authenticated* connection: its
principal is known to the server); for ``floor`` a bare ``asyncio.Protocol``
connection (TLS handshake done when ``--tls``), which is what uvloop alone
costs. Connections are opened 64 at a time so the server's accept backlog
and handshake deadline are never the bottleneck.

``hold_idle`` measures one point: the server's resident set after a warm-up
of a few connections (so one-off allocations are not charged to the
connections), then again once ``total`` connections from ``holders``
processes are idle and the RSS has settled, and reports the growth per
connection in KiB. The holders may run on every CPU (``cpus``): their CPU
time is not measured, and 10,000 TLS handshakes take a while on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from run import ServerProcess, bastion_client  # noqa: E402

__all__ = ["hold_idle"]

WARM_CONNECTIONS = 32
OPEN_AT_ONCE = 64
READY_DEADLINE = 300.0


# -- holder process ------------------------------------------------------------------------


async def _hold(kind: str, port: int, count: int, tls: Path | None) -> None:
    gate = asyncio.Semaphore(OPEN_AT_ONCE)
    keep: list[Any] = []

    async def open_one() -> None:
        async with gate:
            if kind == "bastion":
                client = bastion_client(port, tls, timeout=30, health_interval=None)
                await client.connect()
                keep.append(client)
            else:
                from certs import floor_client_context

                context = floor_client_context(tls) if tls is not None else None
                loop = asyncio.get_running_loop()
                transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port, ssl=context)
                keep.append(transport)

    await asyncio.gather(*(open_one() for _ in range(count)))
    print(f"READY {len(keep)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin


def _holder_main() -> None:
    parser = argparse.ArgumentParser(description="Hold N idle connections to a bench server.")
    parser.add_argument("kind", choices=("floor", "bastion"))
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--tls", type=Path, default=None)
    opts = parser.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_hold(opts.kind, opts.port, opts.count, opts.tls))


# -- measurement ---------------------------------------------------------------------------


class _Holder:
    def __init__(self, server: ServerProcess, count: int, tls: Path | None, cpus: set[int] | None) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), server.kind, str(server.port), str(count)]
        if tls is not None:
            cmd += ["--tls", str(tls)]
        self.count = count
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if cpus is not None:
            os.sched_setaffinity(self.proc.pid, cpus)

    def wait_ready(self, deadline: float) -> None:
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"idle holder exited with status {self.proc.wait()} before all were connected")
            if line.strip() == f"READY {self.count}":
                return
        raise RuntimeError(f"idle holder: {self.count} connections not up within {READY_DEADLINE:.0f}s")

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _settled_rss(server: ServerProcess) -> int:
    """The server's RSS once it stops moving (two reads 0.2 s apart within 1%), at most ~3 s."""
    last = server.memory_kib()["rss"]
    for _ in range(15):
        time.sleep(0.2)
        now = server.memory_kib()["rss"]
        if abs(now - last) <= last * 0.01:
            return now
        last = now
    return last


def hold_idle(
    server: ServerProcess, tls: Path | None, total: int, holders: int, cpus: set[int] | None
) -> dict[str, Any]:
    """Open ``total`` idle connections to ``server`` from ``holders`` processes; RSS growth per connection."""
    started: list[_Holder] = []
    try:
        warm = _Holder(server, WARM_CONNECTIONS, tls, cpus)
        started.append(warm)
        warm.wait_ready(time.monotonic() + READY_DEADLINE)
        rss0 = _settled_rss(server)
        t0 = time.perf_counter()
        share, extra = divmod(total, holders)
        batch = [_Holder(server, share + (i < extra), tls, cpus) for i in range(holders)]
        started += batch
        deadline = time.monotonic() + READY_DEADLINE
        for holder in batch:
            holder.wait_ready(deadline)
        seconds = time.perf_counter() - t0
        rss1 = _settled_rss(server)
    finally:
        for holder in started:
            holder.stop()
    return {
        "connections": total,
        "connect_seconds": round(seconds, 2),
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_connection": (rss1 - rss0) / total,
    }


if __name__ == "__main__":
    _holder_main()
