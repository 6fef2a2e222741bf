"""bastion/protocol/proxy.py: the PROXY protocol v2 header, strictly checked, never over-read."""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.client._common import build_hello
from bastion.exceptions import LocalProtocolError
from bastion.protocol.connection import Connection
from bastion.protocol.limits import ProtocolLimits
from bastion.protocol.messages import GoAway
from bastion.protocol.proxy import (
    DIRECT_CLIENT_REASON,
    MAX_HEADER_SIZE,
    PREFIX_SIZE,
    SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    build,
    direct_client_answer,
    parse,
)
from bastion.protocol.state import Role
from bastion.status import Status

FAST = settings(max_examples=300, deadline=None)

# A header HAProxy 2.6 sends with send-proxy-v2 for a client 127.0.0.7:40000 -> 127.0.0.1:8443.
HAPROXY_TCP4 = (
    SIGNATURE
    + bytes([0x21, 0x11])
    + struct.pack("!H", 12)
    + bytes([127, 0, 0, 7, 127, 0, 0, 1])
    + struct.pack("!HH", 40000, 8443)
)


def tcp4(src: str = "192.0.2.1", sport: int = 1234, tlvs: tuple[tuple[int, bytes], ...] = ()) -> ProxyHeader:
    return ProxyHeader(Command.PROXY, Family.TCP4, (src, sport), ("198.51.100.2", 443), tlvs)


def read_all(data: bytes, chunk: int = 1 << 20) -> tuple[ProxyHeader | None, int]:
    """Feed ``data`` in pieces of at most ``chunk`` bytes, as a socket loop would; (header, bytes consumed)."""
    reader = ProxyHeaderReader()
    offset = 0
    while reader.needed:
        piece = data[offset : offset + min(chunk, reader.needed)]
        if not piece:
            return None, offset
        offset += len(piece)
        if reader.feed(piece) is not None:
            break
    return reader.header, offset


def test_a_haproxy_tcp4_header_decodes() -> None:
    header = parse(HAPROXY_TCP4)
    assert header == ProxyHeader(Command.PROXY, Family.TCP4, ("127.0.0.7", 40000), ("127.0.0.1", 8443))
    assert header.peer == "127.0.0.7:40000"


def test_tcp6_with_tlvs() -> None:
    header = ProxyHeader(Command.PROXY, Family.TCP6, ("2001:db8::1", 5), ("::1", 443), ((0x01, b"bastion/1"),))
    data = build(header)
    assert len(data) == PREFIX_SIZE + 36 + 3 + 9
    assert parse(data) == header
    assert header.peer == "2001:db8::1:5"  # the Link.peer format: host, then the port after the last colon


def test_local_keeps_nothing() -> None:
    assert parse(build(ProxyHeader(Command.LOCAL))) == ProxyHeader(Command.LOCAL)
    # LOCAL with a family and addresses (allowed by the specification): the block is skipped.
    data = SIGNATURE + bytes([0x20, 0x11]) + struct.pack("!H", 12) + bytes(12)
    assert parse(data) == ProxyHeader(Command.LOCAL)
    assert ProxyHeader(Command.LOCAL).peer is None


def test_the_reader_never_takes_a_byte_past_the_header() -> None:
    tls_hello = b"\x16\x03\x01\x02\x00" + b"x" * 50
    stream = build(tcp4(tlvs=((0x04, b"\x00" * 7),))) + tls_hello
    for chunk in (1, 3, 16, 1000):
        header, consumed = read_all(stream, chunk)
        assert header == tcp4(tlvs=((0x04, b"\x00" * 7),))
        assert stream[consumed:] == tls_hello
    reader = ProxyHeaderReader()
    with pytest.raises(LocalProtocolError):
        reader.feed(stream[:17])  # more than the 16 it asked for


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", r"v1 \(text\) is not supported"),
        (b"\x16\x03\x01" + bytes(13), "signature does not match"),
        (SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12), "version 1 is not supported"),
        (SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12), "unknown PROXY protocol command"),
        (SIGNATURE + bytes([0x21, 0x41, 0, 12]) + bytes(12), "unknown PROXY protocol address family"),
        (SIGNATURE + bytes([0x21, 0x13, 0, 12]) + bytes(12), "unknown PROXY protocol address family"),
        (SIGNATURE + bytes([0x21, 0x12, 0, 12]) + bytes(12), "TCP over IPv4 or IPv6"),  # UDP4
        (SIGNATURE + bytes([0x21, 0x31, 0, 216]) + bytes(216), "TCP over IPv4 or IPv6"),  # UNIX
        (SIGNATURE + bytes([0x21, 0x00, 0, 0]), "TCP over IPv4 or IPv6"),  # PROXY + UNSPEC
        (SIGNATURE + bytes([0x21, 0x11, 0, 11]) + bytes(11), "needs at least 12"),
        (SIGNATURE + bytes([0x21, 0x21, 0, 35]) + bytes(35), "needs at least 36"),
        (SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", MAX_HEADER_SIZE), "exceeds the limit"),
        (SIGNATURE + bytes([0x21, 0x11, 0, 14]) + bytes(14), "stray bytes"),
        (SIGNATURE + bytes([0x21, 0x11, 0, 16]) + bytes(12) + b"\x01\x00\x05\x00", "runs past the header"),
    ],
)
def test_bad_headers_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        read_all(data)
    if len(data) >= PREFIX_SIZE:
        with pytest.raises(ProxyHeaderError, match=message):
            parse(data)


def test_the_size_limit_is_checked_from_the_prefix_alone() -> None:
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError, match="exceeds the limit"):
        reader.feed(SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 0xFFFF))


def test_parse_wants_exactly_one_header() -> None:
    data = build(tcp4())
    with pytest.raises(ProxyHeaderError):
        parse(data + b"\x16")
    with pytest.raises(ProxyHeaderError):
        parse(data[:-1])
    with pytest.raises(ProxyHeaderError):
        parse(data[:10])


def test_build_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(LocalProtocolError):
        build(ProxyHeader(Command.PROXY))
    with pytest.raises(LocalProtocolError):
        build(tcp4(src="::1"))
    with pytest.raises(LocalProtocolError):
        build(tcp4(tlvs=((0x20, bytes(MAX_HEADER_SIZE)),)))


# -- properties ----------------------------------------------------------------------------

ports = st.integers(0, 65535)
tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=6).map(tuple)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
headers = st.one_of(
    st.just(ProxyHeader(Command.LOCAL)),
    st.builds(
        lambda s, sp, d, dp, t: ProxyHeader(Command.PROXY, Family.TCP4, (s, sp), (d, dp), t), v4, ports, v4, ports, tlvs
    ),
    st.builds(
        lambda s, sp, d, dp, t: ProxyHeader(Command.PROXY, Family.TCP6, (s, sp), (d, dp), t), v6, ports, v6, ports, tlvs
    ),
)


@FAST
@given(headers, st.integers(1, 64))
def test_round_trip(header: ProxyHeader, chunk: int) -> None:
    data = build(header)
    assert parse(data) == header
    assert read_all(data + b"rest", chunk) == (header, len(data))
    if header.source is not None:
        assert ipaddress.ip_address(header.source[0])  # a canonical address string


@FAST
@given(st.binary(max_size=300), st.integers(1, 64))
def test_garbage_raises_only_proxy_header_errors(data: bytes, chunk: int) -> None:
    with contextlib.suppress(ProxyHeaderError):
        read_all(data, chunk)
    with contextlib.suppress(ProxyHeaderError):
        parse(data)


@FAST
@given(headers, st.data())
def test_corrupted_headers_raise_only_proxy_header_errors(header: ProxyHeader, data: st.DataObject) -> None:
    """Valid headers with bytes flipped, cut or added: decoded or refused, never another exception."""
    raw = bytearray(build(header))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))] + data.draw(st.binary(max_size=8))
    for attempt in (lambda: parse(bytes(raw)), lambda: read_all(bytes(raw), 7)):
        with contextlib.suppress(ProxyHeaderError):
            attempt()


def first_bytes_of_a_client_hello() -> bytes:
    """What a real TLS client sends first (Python's ssl, as bastion's clients use it)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="bastion.example")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def first_bytes_of_a_bastion_hello(token: str | None, name: str) -> bytes:
    core = Connection(Role.CLIENT, ProtocolLimits())
    core.send_hello(build_hello(ProtocolLimits(), token, name))
    return core.data_to_send()


def test_a_client_that_skipped_the_balancer_gets_a_fixed_answer_from_the_prefix_alone() -> None:
    hello = first_bytes_of_a_client_hello()
    tls = direct_client_answer(hello[:PREFIX_SIZE])
    assert tls is not None
    assert tls.answer == bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49])  # a fatal access_denied alert record
    for token, name in ((None, ""), ("t" * 500, "bastion-python")):
        data = first_bytes_of_a_bastion_hello(token, name)
        assert len(data) >= PREFIX_SIZE  # the reader's prefix is there before it decides
        refusal = direct_client_answer(data[:PREFIX_SIZE])
        assert refusal is not None
        client = Connection(Role.CLIENT, ProtocolLimits())
        client.send_hello(build_hello(ProtocolLimits(), None, "x"))
        assert client.receive_data(refusal.answer) == [GoAway(0, int(Status.FAILED_PRECONDITION), DIRECT_CLIENT_REASON)]
    # Anything else (HTTP, v1 text, a corrupted header, a frame that is not a Hello) gets no answer.
    for other in (b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3.4", SIGNATURE + b"\x31\x11\x00\x0c", bytes(16)):
        assert direct_client_answer(other) is None
    assert direct_client_answer(b"\x00\x00\x00\x10\x97\x03" + bytes(10)) is None  # a Call's tag, not a Hello's


@FAST
@given(st.sampled_from([b"", b"\x16\x03", b"\x00\x00\x00"]), st.binary(max_size=PREFIX_SIZE))
def test_the_answer_is_fixed_small_and_depends_on_six_bytes_at_most(start: bytes, rest: bytes) -> None:
    data = (start + rest)[:PREFIX_SIZE]
    found = direct_client_answer(data)
    assert found is None or len(found.answer) < 200
    if len(data) >= 6:
        assert found == direct_client_answer(data[:6] + bytes(10))
