"""The in-memory transport pair (bastion/transport/memory.py)."""

import asyncio
from typing import Any

from bastion.transport.memory import MemoryTransport, connect_pair


class Recorder(asyncio.Protocol):
    """Writes down every callback it gets."""

    def __init__(self) -> None:
        self.transport: MemoryTransport | None = None
        self.events: list[tuple[str, Any]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, MemoryTransport)
        self.transport = transport
        self.events.append(("made", None))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))

    @property
    def data(self) -> bytes:
        return b"".join(value for kind, value in self.events if kind == "data")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_connect_pair_calls_connection_made_on_both() -> None:
    async def main() -> None:
        server, client = Recorder(), Recorder()
        st, ct = connect_pair(server, client)
        assert server.events == [("made", None)] and client.events == [("made", None)]
        assert server.transport is st and client.transport is ct
        assert isinstance(st, asyncio.Transport)
        assert st.get_protocol() is server and ct.get_protocol() is client

    run(main())


def test_peername_names_the_other_end() -> None:
    async def main() -> None:
        st, ct = connect_pair(Recorder(), Recorder())
        kind, number = st.get_extra_info("peername")
        assert kind == "memory" and isinstance(number, int)
        assert st.get_extra_info("peername") == ct.get_extra_info("sockname")
        assert ct.get_extra_info("peername") == st.get_extra_info("sockname")
        assert st.get_extra_info("peername") != ct.get_extra_info("peername")
        assert st.get_extra_info("socket") is None
        assert st.get_extra_info("socket", "default") == "default"
        other, _ = connect_pair(Recorder(), Recorder())
        assert other.get_extra_info("peername") != st.get_extra_info("peername")

    run(main())


def test_writes_arrive_later_in_order_both_ways() -> None:
    async def main() -> None:
        server, client = Recorder(), Recorder()
        st, ct = connect_pair(server, client)
        ct.write(b"one ")
        ct.writelines([bytearray(b"two "), memoryview(b"three")])
        ct.write(b"")
        assert server.data == b""  # never synchronously: a protocol is not re-entered
        st.write(b"back")
        await settle()
        assert server.data == b"one two three"
        assert client.data == b"back"
        assert [kind for kind, _ in server.events] == ["made", "data", "data", "data"]

    run(main())


def test_the_writer_is_never_paused() -> None:
    async def main() -> None:
        st, _ = connect_pair(Recorder(), Recorder())
        st.set_write_buffer_limits(high=1, low=0)  # accepted, ignored
        st.write(b"x" * 1_000_000)
        assert st.get_write_buffer_size() == 0
        assert not st.can_write_eof()

    run(main())


def test_close_delivers_what_was_written_then_loses_both_ends_once() -> None:
    async def main() -> None:
        server, client = Recorder(), Recorder()
        st, ct = connect_pair(server, client)
        ct.write(b"last words")
        ct.close()
        assert ct.is_closing() and st.is_closing()
        ct.write(b"too late")
        st.write(b"too late")
        ct.close()
        st.close()
        await settle()
        assert server.events == [("made", None), ("data", b"last words"), ("lost", None)]
        assert client.events == [("made", None), ("lost", None)]

    run(main())


def test_abort_drops_what_was_not_yet_delivered() -> None:
    async def main() -> None:
        server, client = Recorder(), Recorder()
        st, ct = connect_pair(server, client)
        ct.write(b"never seen")
        ct.abort()
        await settle()
        assert server.events == [("made", None), ("lost", None)]
        assert client.events == [("made", None), ("lost", None)]
        assert st.is_closing()

    run(main())


def test_pause_reading_holds_data_until_resumed() -> None:
    async def main() -> None:
        server, client = Recorder(), Recorder()
        st, ct = connect_pair(server, client)
        st.pause_reading()
        assert not st.is_reading()
        ct.write(b"a")
        ct.write(b"b")
        await settle()
        assert server.data == b""
        st.resume_reading()
        assert st.is_reading()
        assert server.data == b""  # on a later loop turn, as from a socket: never inside resume_reading
        ct.write(b"c")  # after the held bytes, in order
        await settle()
        assert server.data == b"abc"

    run(main())


def test_a_protocol_that_pauses_again_gets_no_more_of_the_held_bytes() -> None:
    class Pauser(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            assert self.transport is not None
            self.transport.pause_reading()  # one chunk at a time

    async def main() -> None:
        server, client = Pauser(), Recorder()
        st, ct = connect_pair(server, client)
        st.pause_reading()
        for chunk in (b"a", b"b", b"c"):
            ct.write(chunk)
        await settle()
        st.resume_reading()
        await settle()
        assert server.data == b"a"
        st.resume_reading()
        await settle()
        assert server.data == b"ab"
        st.resume_reading()
        await settle()
        assert server.data == b"abc"

    run(main())
