"""A loopback TCP relay to Redis that can hold back its answers or drop the commands sent to it.

``RedisRelay(host, port)`` (an async context, on the running event loop)
listens on a free loopback port and forwards every connection to Redis.
``mode`` says what it does meanwhile: ``"pass"`` forwards both ways;
``"stall"`` delivers the commands (Redis runs them) but holds back the
answers until the mode changes -- an answer lost on the way; ``"drop"``
discards the commands -- a Redis that does not answer, and runs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

__all__ = ["RedisRelay"]

Mode = Literal["pass", "stall", "drop"]


class RedisRelay:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._mode: Mode = "pass"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        self._mode = mode
        if mode == "stall":
            self._flowing.clear()
        else:
            self._flowing.set()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    async def __aenter__(self) -> RedisRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
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
            asyncio.ensure_future(self._pump(client_r, server_w, answers=False)),
            asyncio.ensure_future(self._pump(server_r, client_w, answers=True)),
        ]
        self._tasks.update(pumps)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
            self._tasks.discard(task)
        for writer in (client_w, server_w):
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, answers: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if answers:
                    await self._flowing.wait()
                elif self._mode == "drop":
                    continue
                writer.write(data)
                await writer.drain()
