"""A loopback TCP relay that can flip one byte of a TLS record in transit.

``FlipRelay(host, port)`` listens on a free loopback port and forwards every
connection to ``host:port``, record by TLS record (5-byte header + body), on
its own event loop in a thread, so sync and async clients can both use it.
``arm("server")`` makes it flip one bit in the middle of the *body* of the
next record the server sends (``"client"``: the next record the client
sends) -- a change only the record's integrity check can catch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Literal

__all__ = ["FlipRelay", "TcpRelay"]

Direction = Literal["server", "client"]


class TcpRelay:
    """Listens on a free loopback port and forwards each connection to ``target``, through ``_pump``:
    one per direction, ``to_client`` saying which (the subclass decides what happens on the way)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        pumps = [
            asyncio.ensure_future(self._pump(client_r, server_w, to_client=False)),
            asyncio.ensure_future(self._pump(server_r, client_w, to_client=True)),
        ]
        self._tasks.update(pumps)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
            self._tasks.discard(task)
        for writer in (client_w, server_w):
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_client: bool) -> None:
        raise NotImplementedError


class FlipRelay(TcpRelay):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.flipped = threading.Event()
        self._armed: Direction | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FlipRelay:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arm(self, direction: Direction = "server") -> None:
        """Flip a bit in the next record that ``direction`` sends."""
        self._loop.call_soon_threadsafe(setattr, self, "_armed", direction)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_client: bool) -> None:
        sender: Direction = "server" if to_client else "client"
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header = await reader.readexactly(5)
                body = bytearray(await reader.readexactly(int.from_bytes(header[3:5], "big")))
                if self._armed == sender and body:
                    self._armed = None
                    body[len(body) // 2] ^= 0x01
                    self.flipped.set()
                writer.write(header + bytes(body))
                await writer.drain()
