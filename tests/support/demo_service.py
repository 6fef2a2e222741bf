"""The service the process-level tests host (copied into each server's cwd).

``bastion serve --service demo_service:service`` imports it. Handlers that
want to be observed from another process write marker files into the
directory named by ``BASTION_TEST_MARKER_DIR``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bastion import Context, Service

service = Service("demo", doc="Test service for the integration tests.")


def _mark(name: str) -> None:
    directory = os.environ.get("BASTION_TEST_MARKER_DIR")
    if directory:
        path = Path(directory) / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(path)  # appears atomically to a poller


@service.method
async def echo(value: Any) -> Any:
    """Return ``value`` unchanged."""
    return value


@service.method
async def echo_str(value: str) -> str:
    """Return the string ``value`` with its Python type name."""
    return f"{type(value).__name__}:{value}"


@service.method
async def echo_int(value: int) -> str:
    """Return the integer ``value`` with its Python type name."""
    return f"{type(value).__name__}:{value}"


@service.method
async def length(text: str) -> int:
    """The number of characters in ``text``."""
    return len(text)


@service.method
async def slow(seconds: float) -> float:
    """Sleep ``seconds``, then return them."""
    await asyncio.sleep(seconds)
    return seconds


@service.method
async def spin(ms: float) -> float:
    """Keep the event loop busy for ``ms`` milliseconds (a handler with a fixed CPU cost)."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return ms


@service.method
async def sleep_then_return(seconds: float, tag: int) -> int:
    """Sleep ``seconds``, then return ``tag``."""
    await asyncio.sleep(seconds)
    return tag


@service.method
async def count(n: int) -> AsyncIterator[int]:
    """Stream 0, 1, ..., n-1."""
    for i in range(n):
        yield i


@service.method
async def watched(tag: str, seconds: float = 30.0) -> str:
    """Sleep ``seconds``; leave marker files saying it started and if it was cancelled."""
    _mark(f"started-{tag}")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _mark(f"cancelled-{tag}")
        raise
    _mark(f"finished-{tag}")
    return tag


@service.method
async def fail(message: str) -> None:
    """Raise a ValueError: the caller gets INTERNAL."""
    raise ValueError(message)


@service.method(roles=["ops"])
async def ops_only(tag: str) -> str:
    """Needs the ``ops`` role; leaves a marker file when it runs."""
    _mark(f"ops-{tag}")
    return tag


@service.method(priority=-5)
async def batch_work(ctx: Context, seconds: float, tag: int) -> int:
    """Batch-priority work: sleeps ``seconds``; marks ``late-TAG`` if it started after its deadline."""
    if ctx.deadline is not None and time.monotonic() > ctx.deadline:
        _mark(f"late-{tag}")
    await asyncio.sleep(seconds)
    return tag


@service.method
async def take(items: AsyncIterator[bytes], hold: float = 0.0, fail_after: int = 0) -> int:
    """Wait ``hold`` seconds before reading, then read the items and return their bytes; with
    ``fail_after``, raise a ValueError (INTERNAL) after that many, the rest left unread."""
    await asyncio.sleep(hold)
    total = taken = 0
    async for item in items:
        total += len(item)
        taken += 1
        if taken == fail_after:
            raise ValueError("failed on purpose")
    return total


@service.method
async def live_blocks() -> int:
    """The interpreter's allocated memory blocks after a full collection: a leak of Python objects
    grows it, where the process's resident size also counts memory the C allocator keeps free."""
    gc.collect()
    return sys.getallocatedblocks()
