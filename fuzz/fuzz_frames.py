"""Fuzz target: arbitrary bytes into a server ``Connection``.

Run under atheris (``pip install atheris``)::

    python fuzz/fuzz_frames.py --seeds corpus/    # once: write a seed corpus
    python fuzz/fuzz_frames.py corpus/ [-max_len=65536] [-max_total_time=600]

``fuzz_one`` is also called by ``tests/protocol/test_fuzz_target.py`` under
hypothesis, so the target is exercised in every test run.

The first input byte picks a mode: whether the connection has already finished
its handshake (so call frames get past the state table), and how the rest is
split into reads. A small application answers what the connection surfaces
(Welcome for a Hello, a Result for a call, credit for a stream), so the fuzzer
reaches call states a passive receiver never would.

Invariants checked: the only exception is ``RemoteProtocolError``; after it
the connection is CLOSED and the last queued frame is a GoAway with a non-OK
code; everything ever queued for the peer decodes as server messages.
"""

from __future__ import annotations

import sys

from bastion.exceptions import RemoteProtocolError
from bastion.protocol.connection import Connection, ProtocolLimits
from bastion.protocol.frames import FrameReader, FrameWriter
from bastion.protocol.messages import (
    PROTOCOL_VERSION,
    Call,
    Cancel,
    Credit,
    End,
    GoAway,
    Hello,
    Item,
    Message,
    Ping,
    ServerMessage,
    Welcome,
)
from bastion.protocol.state import ConnectionState, Role
from bastion.status import Status

LIMITS = ProtocolLimits(max_frame=8192, handshake_max_frame=1024, max_inflight=8, window=4)
HELLO = Hello(PROTOCOL_VERSION, "fuzz", window=4, max_frame=8192)
WELCOME = Welcome(PROTOCOL_VERSION, "fuzz", "anonymous", 8192, 8, 4, 1000)


def _frames(*messages: object) -> bytes:
    writer = FrameWriter(2**32 - 1)
    for message in messages:
        writer.write(message)
    return writer.take()


HELLO_FRAME = _frames(HELLO)


def _answer(conn: Connection, message: Message) -> None:
    """A minimal well-behaved server application."""
    if isinstance(message, Hello):
        conn.send_welcome(WELCOME)
    elif isinstance(message, Call):
        if message.stream:
            conn.grant(message.id, 1)
        else:
            conn.send_result(message.id, None)
    elif isinstance(message, Item):
        conn.grant(message.id, 1)
    elif isinstance(message, End):
        if conn.send_credit(message.id):
            conn.send_item(message.id, "last")
        conn.send_result(message.id, None)


def _chunks(data: bytes, mode: int) -> list[bytes]:
    size = (1, 3, 64, len(data) or 1)[mode & 3]
    return [data[i : i + size] for i in range(0, len(data), size)]


def _check_output(output: bytearray, failed: bool) -> None:
    reader: FrameReader[Message] = FrameReader(ServerMessage, 2**32 - 1)
    messages = reader.feed(bytes(output))
    assert reader.buffered == 0, "partial frame queued"
    if failed:
        assert isinstance(messages[-1], GoAway), "no GoAway after a protocol error"
        assert messages[-1].code != Status.OK


def fuzz_one(data: bytes) -> None:
    """Feed ``data`` to a fresh server connection; raise only on a real bug."""
    if not data:
        return
    mode, data = data[0], data[1:]
    conn = Connection(Role.SERVER, LIMITS)
    output = bytearray()
    if mode & 4:  # start past the handshake
        [hello] = conn.receive_data(HELLO_FRAME)
        _answer(conn, hello)
    failed = False
    try:
        for chunk in _chunks(data, mode):
            for message in conn.receive_data(chunk):
                _answer(conn, message)
            output += conn.data_to_send()
    except RemoteProtocolError:
        failed = True
        assert conn.state is ConnectionState.CLOSED
        assert conn.open_calls == 0
        assert conn.receive_data(HELLO_FRAME) == []
    output += conn.data_to_send()
    _check_output(output, failed)


def seeds() -> list[bytes]:
    """Valid conversations, to give the fuzzer a head start past the decoder."""
    unary = _frames(Call(1, "m", None), Ping(7), Cancel(1))  # type: ignore[arg-type]
    stream = _frames(
        Call(1, "up", [1], stream=True),  # type: ignore[arg-type]
        Item(1, "a"),  # type: ignore[arg-type]
        Credit(1, 2),
        End(1),
        GoAway(0, 0, "bye"),
    )
    return [
        b"\x04" + unary,
        b"\x05" + stream,
        b"\x00" + HELLO_FRAME + unary,
        b"\x02" + HELLO_FRAME + stream,
    ]


def main() -> None:
    if sys.argv[1:2] == ["--seeds"]:
        from pathlib import Path

        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()):
            (out / f"seed-{i}").write_bytes(seed)
        return
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
