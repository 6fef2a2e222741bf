"""Backpressure and slow-reader handling in the asyncio edge (bastion/transport/aio.py).

A fake transport buffers what the Link writes until the test says the peer
has read it, with asyncio's flow control (pause above the high-water mark,
resume below a quarter of it), so every case runs without sockets or sleeps
longer than a timer of a few milliseconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bastion.exceptions import ConnectionClosed
from bastion.transport.aio import Link

HIGH = 1000


class FakeCore:
    """Just enough of a sans-IO Connection: bytes queued by the test go out on flush."""

    state = None

    def __init__(self) -> None:
        self.out = bytearray()
        self.output = self  # the FrameWriter's place: ``output.buffer`` is what waits
        self.buffer = self.out

    def queue(self, n: int) -> None:
        self.out += b"x" * n

    @property
    def pending_output(self) -> int:
        return len(self.out)

    def data_to_send(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def receive_data(self, data: bytes) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class FakeSession:
    def __init__(self) -> None:
        self.closed_with: list[BaseException | None] = []

    def on_connect(self, link: Link) -> None:
        pass

    def on_events(self, events: list[Any]) -> None:
        pass

    def on_close(self, exc: BaseException | None) -> None:
        self.closed_with.append(exc)


class FakeTransport(asyncio.Transport):
    """Holds written bytes until ``peer_reads``; flow control as asyncio's socket transports do it."""

    def __init__(self, protocol: Link) -> None:
        super().__init__({"peername": ("127.0.0.1", 5000)})
        self.protocol = protocol
        self.buffer = 0
        self.high, self.low = 65536, 16384
        self.paused = False
        self.reading = True
        self.closing = False
        self.aborted = False
        self.lost = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        assert high is not None
        self.high, self.low = high, high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def write(self, data: Any) -> None:
        self.buffer += len(data)
        if not self.paused and self.buffer > self.high:
            self.paused = True
            self.protocol.pause_writing()

    def peer_reads(self, n: int) -> None:
        self.buffer = max(self.buffer - n, 0)
        if self.paused and self.buffer <= self.low:
            self.paused = False
            self.protocol.resume_writing()
        if self.closing and not self.buffer:
            self._lose()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        if not self.buffer:
            self._lose()

    def abort(self) -> None:
        self.closing = self.aborted = True
        self.buffer = 0
        self._lose()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


def make(**kwargs: Any) -> tuple[Link, FakeCore, FakeSession, FakeTransport]:
    core, session = FakeCore(), FakeSession()
    link = Link(core, session, write_high_water=HIGH, **kwargs)  # type: ignore[arg-type]
    transport = FakeTransport(link)
    link.connection_made(transport)
    return link, core, session, transport


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_a_server_link_stops_reading_while_its_writes_are_paused() -> None:
    async def main() -> None:
        link, core, _, transport = make(pause_reads_with_writes=True)
        core.queue(HIGH + 1)
        link.flush()
        assert link.writing_paused and not transport.reading
        link.pause_reading("queued calls")  # a second reason holds reading paused on its own
        transport.peer_reads(HIGH)
        assert not link.writing_paused and not transport.reading
        link.resume_reading("queued calls")
        assert transport.reading and not link.reading_paused

    run(main())


def test_a_client_link_keeps_reading_while_its_writes_are_paused() -> None:
    async def main() -> None:
        link, core, _, transport = make()
        core.queue(HIGH + 1)
        link.flush()
        assert link.writing_paused and transport.reading

    run(main())


def test_a_peer_that_stops_reading_is_dropped_after_the_stall_timeout() -> None:
    async def main() -> None:
        link, core, session, transport = make(write_stall_timeout=0.02)
        core.queue(HIGH + 1)
        link.flush()
        await asyncio.sleep(0.05)
        assert transport.aborted and link.dropped is not None and "stalled" in link.dropped
        await asyncio.sleep(0)
        assert link.closed
        assert isinstance(session.closed_with[0], ConnectionClosed)

    run(main())


def test_a_slow_reader_that_makes_progress_is_not_dropped() -> None:
    async def main() -> None:
        link, core, _, transport = make(write_stall_timeout=0.02)
        core.queue(HIGH + 100)
        link.flush()
        for _ in range(3):  # below the high-water mark but still paused: draining, slowly
            await asyncio.sleep(0.015)
            transport.peer_reads(HIGH // 3)
        assert not transport.aborted and link.dropped is None
        assert not link.writing_paused

    run(main())


def test_output_past_the_hard_limit_drops_the_connection_at_once() -> None:
    async def main() -> None:
        link, core, _, transport = make(write_hard_limit=4 * HIGH)
        core.queue(4 * HIGH + 1)
        link.flush()
        assert transport.aborted and link.dropped is not None and "not reading" in link.dropped

    run(main())


def test_a_lot_of_coalesced_output_is_written_at_once() -> None:
    async def main() -> None:
        link, core, _, transport = make()
        core.queue(10)
        link.schedule_flush()
        assert transport.buffer == 0  # small: waits for the end of the loop turn
        core.queue(HIGH)
        link.schedule_flush()
        assert transport.buffer == HIGH + 10 and link.writing_paused

    run(main())


def test_a_close_that_cannot_flush_becomes_an_abort() -> None:
    async def main() -> None:
        link, core, _, transport = make(write_stall_timeout=0.02)
        core.queue(100)
        link.close()
        assert transport.closing and not transport.aborted
        await asyncio.sleep(0.05)
        assert transport.aborted and link.closed

    run(main())
