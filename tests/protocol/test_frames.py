"""bastion/protocol/frames.py: length-prefixed framing, limits checked early."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.exceptions import LocalProtocolError, RemoteProtocolError
from bastion.protocol.frames import HEADER_SIZE, FrameReader, FrameWriter
from bastion.protocol.messages import (
    Call,
    Cancel,
    ClientMessage,
    Credit,
    End,
    GoAway,
    Hello,
    Item,
    Message,
    Ping,
    Pong,
)
from bastion.status import Status
from tests.protocol.helpers import BIG, frame, raw, raw_frame

FAST = settings(max_examples=100, deadline=None)


def reader(max_frame: int = BIG) -> FrameReader[Message]:
    return FrameReader(ClientMessage, max_frame)


# A varied client-side conversation, used as the stream to split.
client_messages = st.lists(
    st.one_of(
        st.builds(Ping, st.integers(0, 2**63 - 1)),
        st.builds(Pong, st.integers(0, 2**63 - 1)),
        st.builds(Cancel, st.integers(1, 2**31)),
        st.builds(End, st.integers(1, 2**31)),
        st.builds(Credit, st.integers(1, 2**31), st.integers(1, 2**31)),
        st.builds(Item, st.integers(1, 2**31), st.binary(max_size=300).map(raw)),
        st.builds(Call, st.integers(1, 2**31), st.text(max_size=20), st.binary(max_size=200).map(raw)),
        st.builds(GoAway, st.integers(0, 2**31), st.integers(0, 16), st.text(max_size=40)),
        st.builds(Hello, st.integers(0, 5), st.text(max_size=20)),
    ),
    min_size=1,
    max_size=25,
)


def normalise(messages: list[Message]) -> list[bytes]:
    # Raw fields compare by identity of their buffer; compare encodings instead.
    return [msgspec.msgpack.encode(m) for m in messages]


# -- round trips ----------------------------------------------------------------


def test_one_frame_round_trip() -> None:
    writer = FrameWriter(BIG)
    writer.write(Ping(7))
    data = writer.take()
    assert data[:HEADER_SIZE] == (len(data) - HEADER_SIZE).to_bytes(4, "big")
    assert reader().feed(data) == [Ping(7)]


def test_take_drains_the_writer() -> None:
    writer = FrameWriter(BIG)
    writer.write(Ping(1))
    writer.write(Pong(2))
    assert len(writer) > 0
    data = writer.take()
    assert len(writer) == 0
    assert writer.take() == b""
    assert reader().feed(data) == [Ping(1), Pong(2)]


def test_raw_field_survives_round_trip_and_later_reads() -> None:
    r = reader()
    [item] = r.feed(frame(Item(3, raw({"k": [1, 2]}))))
    r.feed(frame(Ping(1))[:2])  # more traffic must not disturb the decoded Raw
    assert isinstance(item, Item)
    assert msgspec.msgpack.decode(item.value) == {"k": [1, 2]}


def test_memoryview_and_bytearray_input() -> None:
    data = frame(Ping(1), Cancel(2))
    assert reader().feed(memoryview(data)) == [Ping(1), Cancel(2)]
    assert reader().feed(bytearray(data)) == [Ping(1), Cancel(2)]


def test_byte_at_a_time() -> None:
    messages = [Ping(i) for i in range(5)] + [Item(1, raw(list(range(50))))]
    data = frame(*messages)
    r = reader()
    out: list[Message] = []
    for i in range(len(data)):
        out += r.feed(data[i : i + 1])
    assert normalise(out) == normalise(messages)
    assert r.buffered == 0


@FAST
@given(messages=client_messages, data=st.data())
def test_any_split_decodes_the_same(messages: list[Message], data: st.DataObject) -> None:
    stream = frame(*messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    r = reader()
    out: list[Message] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += r.feed(stream[start:end])
    assert normalise(out) == normalise(messages)
    assert r.buffered == 0


def test_large_frame_in_large_reads_decodes_once_whole() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB, as a file chunk
    data = frame(Item(1, raw(payload)), Ping(7))
    r = reader(max_frame=len(data))
    out: list[Message] = []
    for start in range(0, len(data), 65536):
        out += r.feed(data[start : start + 65536])
    assert normalise(out) == normalise([Item(1, raw(payload)), Ping(7)])
    assert r.buffered == 0


def test_trickled_partial_frame_is_gathered_into_few_parts() -> None:
    # A peer sending a frame a byte per read must not cost an object per byte.
    data = frame(Item(1, raw(b"y" * 20_000)))
    r = reader()
    for i in range(len(data) - 1):
        assert r.feed(data[i : i + 1]) == []
    assert r.buffered == len(data) - 1
    assert len(r._parts) <= 2
    [item] = r.feed(data[-1:])
    assert isinstance(item, Item)
    assert msgspec.msgpack.decode(item.value) == b"y" * 20_000


def test_partial_frame_is_buffered_until_complete() -> None:
    data = frame(Item(1, raw(b"x" * 1000)))
    r = reader()
    assert r.feed(data[:10]) == []
    assert r.buffered == 10
    assert r.feed(data[10:-1]) == []
    assert r.buffered == len(data) - 1
    [item] = r.feed(data[-1:])
    assert isinstance(item, Item)
    assert r.buffered == 0


# -- length limits ----------------------------------------------------------------


@pytest.mark.parametrize("header", [b"\xff\xff\xff\xff", (1025).to_bytes(4, "big")])
@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_length_rejected_after_header_alone(header: bytes, chunked: bool) -> None:
    r = reader(max_frame=1024)
    with pytest.raises(RemoteProtocolError) as info:
        if chunked:
            for byte in header:
                r.feed(bytes([byte]))
        else:
            r.feed(header)
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    assert r.buffered <= HEADER_SIZE


def test_oversized_length_rejected_after_complete_frames() -> None:
    r = reader(max_frame=1024)
    with pytest.raises(RemoteProtocolError) as info:
        r.feed(frame(Ping(1)) + (1025).to_bytes(4, "big") + b"\x00" * 100)
    assert info.value.status is Status.RESOURCE_EXHAUSTED


def test_body_of_oversized_frame_is_never_buffered() -> None:
    r = reader(max_frame=1024)
    r.feed(frame(Ping(1))[:2])
    with pytest.raises(RemoteProtocolError):
        r.feed(b"\xff\xff" + b"\x00" * 4096)
    assert r.buffered <= HEADER_SIZE


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    bodies = (msgspec.msgpack.encode(Item(1, raw(b"x" * pad))) for pad in range(1100, 900, -1))
    body = next(b for b in bodies if len(b) == 1024)
    assert len(reader(max_frame=1024).feed(raw_frame(body))) == 1
    with pytest.raises(RemoteProtocolError):
        reader(max_frame=1023).feed(raw_frame(body)[:HEADER_SIZE])


def test_max_frame_can_be_raised_between_feeds() -> None:
    r = reader(max_frame=16)
    big = frame(Item(1, raw(b"x" * 100)))
    r.max_frame = 1024
    assert len(r.feed(big)) == 1


def test_zero_length_frame_rejected() -> None:
    with pytest.raises(RemoteProtocolError):
        reader().feed(b"\x00\x00\x00\x00")


# -- malformed bodies -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used MessagePack byte
        b"\x92",  # truncated array
        msgspec.msgpack.encode([99, 1]),  # unknown type code
        msgspec.msgpack.encode([2, 1, "s", "p", 1, 1, 1, 1]),  # Welcome: a server message
        msgspec.msgpack.encode([4, 1, None]),  # Result: a server message
        msgspec.msgpack.encode([10, "not an int"]),  # Ping with a string payload
        msgspec.msgpack.encode([3, "1", "m", None]),  # Call id as a string
        msgspec.msgpack.encode([6]),  # Cancel missing its id
        msgspec.msgpack.encode({"type": 10, "payload": 1}),  # a map, not an array
        msgspec.msgpack.encode([10, 1]) + b"\x00",  # trailing bytes
        msgspec.msgpack.encode(["10", 1]),  # type code as a string
        msgspec.msgpack.encode(None),
        b"\x94\x03\x01\xa1\x80\xc0",  # Call whose method is not UTF-8
        b"\x93\x01\x01\xa2\xc3\x28",  # Hello whose client name is not UTF-8
        b"\x97\x01\x01\xa1c\xc0\x10\xcd\x04\x00\x81\xa1\xff\xa0",  # ... metadata key
    ],
)
def test_malformed_body_rejected(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        reader().feed(raw_frame(body))


def test_deeply_nested_raw_value_is_a_protocol_error() -> None:
    # A Call whose args nest 10k arrays deep: msgspec raises RecursionError
    # while skipping the Raw value, which must not escape as such.
    body = b"\x94\x03\x01\xa1m" + b"\x91" * 10_000 + b"\xc0"
    with pytest.raises(RemoteProtocolError):
        reader().feed(raw_frame(body))


@FAST
@given(st.binary(min_size=1, max_size=200))
def test_random_body_decodes_or_is_a_protocol_error(body: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        reader().feed(raw_frame(body))


# -- writer -------------------------------------------------------------------------


def test_writer_refuses_frame_above_max_and_keeps_buffer() -> None:
    writer = FrameWriter(64)
    writer.write(Ping(1))
    before = len(writer)
    with pytest.raises(LocalProtocolError) as info:
        writer.write(Item(1, raw(b"x" * 100)))
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    assert len(writer) == before
    assert reader().feed(writer.take()) == [Ping(1)]


def test_writer_refuses_unencodable_and_keeps_buffer() -> None:
    writer = FrameWriter(BIG)
    writer.write(Ping(1))
    before = len(writer)
    with pytest.raises(LocalProtocolError):
        writer.write(Item(1, object()))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        writer.write(Ping(2**70))
    assert len(writer) == before
    assert reader().feed(writer.take()) == [Ping(1)]
