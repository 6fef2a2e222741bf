"""A hostile or broken bastion server for the client tests: real TCP, frames exactly as a test writes them.

``HostileServer(script)`` listens on loopback (plaintext) in its own thread
with its own event loop, so both the async and the sync client can talk to
it. Each connection runs ``script(peer)``; ``peer.handshake()`` reads the
client's Hello and answers with a Welcome (or leave it out, to never answer),
``peer.read()`` gives the next decoded message, ``peer.send_raw(bytes)``
writes frames as given. Whatever the client sends is recorded per
connection (``peer.received``), so a test can see the client's Cancel or
GoAway.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

__all__ = [
    "CALL",
    "CANCEL",
    "GOAWAY",
    "HELLO",
    "HostileServer",
    "Peer",
    "encode",
    "frame",
    "result_frame",
    "wait_for",
]

HELLO, WELCOME, CALL, RESULT, ERROR, CANCEL, ITEM, END, CREDIT, PING, PONG, GOAWAY = range(1, 13)
#: A MessagePack str of two bytes that are not UTF-8.
BAD_UTF8 = b"\xa2\xff\xfe"


def frame(body: bytes) -> bytes:
    """One frame: the 4-byte big-endian length, then ``body``."""
    return len(body).to_bytes(4, "big") + body


def encode(message: object) -> bytes:
    return frame(msgspec.msgpack.encode(message))


def result_frame(call_id: int, value: bytes) -> bytes:
    """A Result whose value is the MessagePack bytes given, as they are."""
    return frame(b"\x93\x04" + msgspec.msgpack.encode(call_id) + value)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """Block until ``predicate()`` holds, looking every 5 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


class Peer:
    """One client connection, as the hostile server sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received: list[list[Any]] = []
        self.closed = threading.Event()  # set once the client's end is closed (EOF or reset)

    async def read(self, timeout: float = 10.0) -> list[Any]:
        """The client's next message; EOFError once it has closed."""
        try:
            async with asyncio.timeout(timeout):
                length = int.from_bytes(await self.reader.readexactly(4), "big")
                message: list[Any] = msgspec.msgpack.decode(await self.reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
            raise EOFError("the client closed the connection") from None
        self.received.append(message)
        return message

    async def read_call(self) -> list[Any]:
        """The client's next Call (skipping anything else it sends first)."""
        while True:
            message = await self.read()
            if message[0] == CALL:
                return message

    async def handshake(self, *, max_inflight: int = 100, window: int = 16, max_frame: int = 1 << 20) -> None:
        hello = await self.read()
        assert hello[0] == HELLO, hello
        self.send(WELCOME, 1, "hostile/1", "anonymous", max_frame, max_inflight, window, 30_000, {})

    def send(self, *fields: Any) -> None:
        self.send_raw(encode(list(fields)))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def until_closed(self, timeout: float = 10.0) -> None:
        """Read (and record) until the client closes the connection."""
        try:
            while True:
                await self.read(timeout)
        except EOFError:
            return


Script = Callable[[Peer], Awaitable[None]]


class HostileServer:
    """A server on 127.0.0.1 that runs ``script`` for each connection, in a thread of its own."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-server", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the hostile server did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._shutdown)
            self._thread.join(10)
        assert not self.errors, self.errors

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.peers.append(peer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(peer)
        except EOFError:
            pass
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # the test's script failed: report it from stop()
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            writer.close()

    def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        self._loop.call_later(0.05, self._loop.stop)
