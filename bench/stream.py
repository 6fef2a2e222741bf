"""Streamed transfer: send N bytes in 256 KiB chunks to a server that counts them; MB/s and server memory.

bastion: the public ``bastion.Client.upload`` into ``bench.sink``, a
client-stream method (``AsyncIterator[bytes]``) behind the whole stack
(TLS if asked, token, role check, rate limit, scheduler, validation of
every item), with the protocol's credit window bounding what is in flight.

floor: raw asyncio streams over the same length-prefixed msgpack frames as
the floor's unary calls: each chunk is encoded as ``[0, chunk]`` (one copy,
as bastion's encoder makes), written, and ``drain()`` awaited (TCP flow
control bounds memory); a final ``[-1, b""]`` asks for the byte count, which
must match.

The figure is bytes sent / seconds from the first chunk to the server's
answer. Server memory is its resident set before the transfers and its peak
(VmHWM) after them, from /proc: a bounded transfer leaves the peak a few MiB
above the start, whatever the size.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from run import ServerProcess, bastion_client, process_cpu_seconds
from servers import BASTION_SINK

__all__ = ["CHUNK", "transfer"]

CHUNK = 256 * 1024


async def _floor_upload(port: int, tls: Path | None, total: int) -> int:
    import msgspec
    from certs import floor_client_context

    context = floor_client_context(tls) if tls is not None else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, limit=1 << 20)
    encode, decode = msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder().decode
    try:
        for chunk in _chunks(total):
            body = encode((0, chunk))
            writer.write(len(body).to_bytes(4, "big"))
            writer.write(body)
            await writer.drain()
        body = encode((-1, b""))
        writer.write(len(body).to_bytes(4, "big") + body)
        size = int.from_bytes(await reader.readexactly(4), "big")
        _, counted = decode(await reader.readexactly(size))
        return int(counted)
    finally:
        writer.close()


async def _bastion_upload(port: int, tls: Path | None, total: int) -> int:
    async with bastion_client(port, tls, timeout=600) as client:
        return int(await client.upload(BASTION_SINK, _chunks(total)))


def _chunks(total: int) -> Iterator[bytes]:
    chunk = bytes(CHUNK)
    for _ in range(total // CHUNK):
        yield chunk


async def transfer(server: ServerProcess, tls: Path | None, total: int, repeat: int) -> list[dict[str, Any]]:
    """``repeat`` uploads of ``total`` bytes (a multiple of CHUNK) to ``server``; one result each."""
    upload = _bastion_upload if server.kind == "bastion" else _floor_upload
    results = []
    rss_before = server.memory_kib()["rss"]
    for _ in range(repeat):
        cpu0, me0, t0 = server.cpu_seconds(), process_cpu_seconds("self"), time.perf_counter()
        counted = await upload(server.port, tls, total)
        seconds, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
        client_cpu = process_cpu_seconds("self") - me0
        if counted != total:
            raise RuntimeError(f"{server.kind}: server counted {counted} bytes of {total}")
        memory = server.memory_kib()
        results.append(
            {
                "bytes": total,
                "seconds": round(seconds, 4),
                "mb_s": total / seconds / 1e6,
                "server_cpu_s_per_gb": cpu / (total / 1e9),
                "client_cpu_s_per_gb": client_cpu / (total / 1e9),
                "rss_before_kib": rss_before,
                "rss_peak_kib": memory["hwm"],
            }
        )
    return results
