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

from tests.support.relay import TcpRelay

__all__ = ["RedisRelay"]

Mode = Literal["pass", "stall", "drop"]


class RedisRelay(TcpRelay):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._mode: Mode = "pass"
        self._flowing = asyncio.Event()
        self._flowing.set()

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
        await self._listen()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_client: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if to_client:  # Redis's answers
                    await self._flowing.wait()
                elif self._mode == "drop":
                    continue
                writer.write(data)
                await writer.drain()
