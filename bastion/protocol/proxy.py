"""The PROXY protocol, version 2: the header a load balancer sends before the client's bytes.

A TCP load balancer (HAProxy with ``send-proxy-v2``) opens its own
connection to the server, so the server's socket names the balancer, not
the client. PROXY protocol v2 fixes that: the balancer's first bytes on the
connection are a binary header carrying the client's address and port.
Only v2 (binary) is accepted here; the v1 text form is refused with an
error that says so.

The header (https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt,
section 2.2)::

    12 bytes  signature  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
     1 byte   version (high nibble, must be 2) | command (low nibble: 0 LOCAL, 1 PROXY)
     1 byte   address family (high nibble) | transport (low nibble)
     2 bytes  length of what follows, big-endian
     then     addresses: TCP4 src(4) dst(4) sport(2) dport(2); TCP6 src(16) dst(16) sport(2) dport(2)
     then     TLVs to the end: type(1) length(2, big-endian) value

Validation is strict: a wrong signature, version, command or family, a
length too short for the family's addresses, a TLV that runs past the end,
or a header longer than ``MAX_HEADER_SIZE`` is a ``ProxyHeaderError``.
A PROXY command must carry TCP over IPv4 or IPv6 (what bastion serves); a
LOCAL command (the balancer's own connection, e.g. a health check) carries
nothing to use, so its address block is skipped whatever its family, as the
specification asks. TLVs are checked for structure and returned, never
interpreted.

Theory of operation. Sans-IO, and careful never to read a byte too many:
the bytes after the header are the client's TLS handshake and belong to
someone else, so ``ProxyHeaderReader.needed`` says exactly how many bytes
to read next (16, then the length the prefix announced) and ``feed`` takes
no more than that. ``parse`` decodes one whole header; ``build`` encodes
one (for tests, and for anything that has to speak to a server behind a
balancer).

A client that skips the balancer. A client connecting straight from a
trusted address (an operator on the balancer's host, a misconfigured health
check) sends its TLS ClientHello or bastion Hello where the header belongs.
``direct_client_answer`` looks at the fixed prefix the reader already holds
(``PREFIX_SIZE`` bytes, no more) and, if it starts like one of those, gives a
fixed answer saying why (``DIRECT_CLIENT_REASON``): a plaintext TLS fatal
``access_denied`` alert (legal before the handshake), or a bastion GoAway
``FAILED_PRECONDITION``, as any handshake refusal. It matches a few bytes
against fixed patterns and never parses them; the answer does not depend on
anything else the client sent, and the server sends it once and closes.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from bastion.exceptions import LocalProtocolError, RemoteProtocolError, UsageError
from bastion.protocol.frames import FrameWriter
from bastion.protocol.messages import GoAway
from bastion.status import Status

__all__ = [
    "DIRECT_CLIENT_REASON",
    "MAX_HEADER_SIZE",
    "PREFIX_SIZE",
    "SIGNATURE",
    "Command",
    "DirectClientAnswer",
    "Family",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "build",
    "direct_client_answer",
    "header_size",
    "parse",
    "parse_networks",
]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The fixed part: signature, version/command, family, length.
PREFIX_SIZE = 16
#: The largest header accepted, TLVs included (TCP6 addresses take 52 bytes of it).
MAX_HEADER_SIZE = 1024

_VERSION = 0x2
_PREFIX = struct.Struct("!12sBBH")
_TLV = struct.Struct("!BH")


class Command(enum.IntEnum):
    """What the connection is: the balancer's own (LOCAL) or a client's, relayed (PROXY)."""

    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    """The address family and transport byte (only those bastion accepts in a PROXY command, and UNSPEC)."""

    UNSPEC = 0x00
    TCP4 = 0x11
    TCP6 = 0x21


#: Address block size per family byte (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX).
_ADDRESS_SIZE = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
_ADDRESSES = {Family.TCP4: struct.Struct("!4s4sHH"), Family.TCP6: struct.Struct("!16s16sHH")}


class ProxyHeaderError(RemoteProtocolError):
    """The bytes are not a valid PROXY protocol v2 header (the connection must be closed)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One decoded header.

    For ``Command.PROXY``: ``source`` is the client's ``(host, port)``,
    ``destination`` the address the client connected to. For
    ``Command.LOCAL``: both None, ``family`` UNSPEC and ``tlvs`` empty (the
    connection's own endpoints are the real ones).
    """

    command: Command
    family: Family = Family.UNSPEC
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    #: ``(type, value)`` pairs in the order received; not interpreted.
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def peer(self) -> str | None:
        """``"host:port"`` of the client (the format of ``Link.peer``), or None for LOCAL."""
        return f"{self.source[0]}:{self.source[1]}" if self.source is not None else None


def header_size(prefix: bytes) -> int:
    """The whole header's size, from its first ``PREFIX_SIZE`` bytes (checked here)."""
    if len(prefix) != PREFIX_SIZE:
        raise LocalProtocolError(f"header_size needs exactly {PREFIX_SIZE} bytes, got {len(prefix)}")
    signature, version_command, family, length = _PREFIX.unpack(prefix)
    if signature != SIGNATURE:
        if prefix.startswith(b"PROXY "):
            raise ProxyHeaderError("PROXY protocol v1 (text) is not supported; send version 2 (send-proxy-v2)")
        raise ProxyHeaderError("expected a PROXY protocol v2 header: the signature does not match")
    if version_command >> 4 != _VERSION:
        raise ProxyHeaderError(f"PROXY protocol version {version_command >> 4} is not supported (only 2)")
    command = version_command & 0x0F
    if command not in (Command.LOCAL, Command.PROXY):
        raise ProxyHeaderError(f"unknown PROXY protocol command 0x{command:x}")
    if family >> 4 not in _ADDRESS_SIZE or family & 0x0F > 0x2:
        raise ProxyHeaderError(f"unknown PROXY protocol address family 0x{family:02x}")
    if command == Command.PROXY:
        if family not in (Family.TCP4, Family.TCP6):
            raise ProxyHeaderError(f"a PROXY header must carry TCP over IPv4 or IPv6, not family 0x{family:02x}")
        if length < _ADDRESS_SIZE[family >> 4]:
            raise ProxyHeaderError(
                f"a {Family(family).name} PROXY header needs at least {_ADDRESS_SIZE[family >> 4]} "
                f"bytes of addresses, its length says {length}"
            )
    if PREFIX_SIZE + length > MAX_HEADER_SIZE:
        raise ProxyHeaderError(f"PROXY header of {PREFIX_SIZE + length} bytes exceeds the limit of {MAX_HEADER_SIZE}")
    return PREFIX_SIZE + int(length)


def parse(data: bytes) -> ProxyHeader:
    """Decode exactly one whole header (no bytes before or after it)."""
    if len(data) < PREFIX_SIZE:
        raise ProxyHeaderError(f"a PROXY header is at least {PREFIX_SIZE} bytes, got {len(data)}")
    size = header_size(bytes(data[:PREFIX_SIZE]))
    if len(data) != size:
        raise ProxyHeaderError(f"the PROXY header's length says {size} bytes, got {len(data)}")
    if data[12] & 0x0F == Command.LOCAL:
        return ProxyHeader(Command.LOCAL)
    family = Family(data[13])
    layout = _ADDRESSES[family]
    src, dst, sport, dport = layout.unpack_from(data, PREFIX_SIZE)
    host = ipaddress.IPv4Address if family is Family.TCP4 else ipaddress.IPv6Address
    tlvs = _parse_tlvs(memoryview(data)[PREFIX_SIZE + layout.size :])
    return ProxyHeader(Command.PROXY, family, (str(host(src)), sport), (str(host(dst)), dport), tlvs)


def _parse_tlvs(view: memoryview) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(view):
        if len(view) - offset < _TLV.size:
            raise ProxyHeaderError(f"{len(view) - offset} stray bytes after the PROXY header's TLVs")
        kind, length = _TLV.unpack_from(view, offset)
        offset += _TLV.size
        if offset + length > len(view):
            raise ProxyHeaderError(f"a PROXY header TLV (type 0x{kind:02x}) of {length} bytes runs past the header")
        tlvs.append((kind, bytes(view[offset : offset + length])))
        offset += length
    return tuple(tlvs)


def build(header: ProxyHeader) -> bytes:
    """Encode ``header`` (LOCAL: an UNSPEC header with no addresses; its TLVs, if any, are still written)."""
    body = bytearray()
    if header.command is Command.PROXY:
        if header.family not in _ADDRESSES or header.source is None or header.destination is None:
            raise LocalProtocolError("a PROXY header needs family TCP4 or TCP6, a source and a destination")
        host = ipaddress.IPv4Address if header.family is Family.TCP4 else ipaddress.IPv6Address
        try:
            body += _ADDRESSES[header.family].pack(
                host(header.source[0]).packed,
                host(header.destination[0]).packed,
                header.source[1],
                header.destination[1],
            )
        except (ValueError, struct.error) as exc:
            raise LocalProtocolError(f"bad address for a {header.family.name} PROXY header: {exc}") from None
        family = header.family
    else:
        family = Family.UNSPEC
    for kind, value in header.tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise LocalProtocolError(f"bad TLV: type {kind}, {len(value)} bytes")
        body += _TLV.pack(kind, len(value)) + value
    if PREFIX_SIZE + len(body) > MAX_HEADER_SIZE:
        raise LocalProtocolError(f"PROXY header of {PREFIX_SIZE + len(body)} bytes exceeds {MAX_HEADER_SIZE}")
    return _PREFIX.pack(SIGNATURE, _VERSION << 4 | header.command, family, len(body)) + bytes(body)


class ProxyHeaderReader:
    """Reads one header from a byte stream without taking a byte past its end.

    Loop: read at most ``needed`` bytes, ``feed`` them; ``feed`` returns the
    header once complete (``needed`` is then 0). Errors are ProxyHeaderError.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._size = PREFIX_SIZE  # the whole header's size, once the prefix is known
        self._sized = False
        self._header: ProxyHeader | None = None

    @property
    def needed(self) -> int:
        """How many more bytes the header needs (0 once complete)."""
        return self._size - len(self._buffer)

    @property
    def header(self) -> ProxyHeader | None:
        return self._header

    @property
    def received(self) -> bytes:
        """The bytes fed so far (at most the header's size: what ``direct_client_answer`` looks at)."""
        return bytes(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        """Add ``data`` (at most ``needed`` bytes); the header once it is complete, else None."""
        if len(data) > self.needed:
            raise LocalProtocolError(f"fed {len(data)} bytes to a PROXY header reader that needs {self.needed}")
        self._buffer += data
        if not self._sized and len(self._buffer) == PREFIX_SIZE:
            self._size = header_size(bytes(self._buffer))
            self._sized = True
        if self.needed == 0 and self._header is None:
            self._header = parse(bytes(self._buffer))
        return self._header


def parse_networks(entries: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``trusted_proxies`` as networks (a bare address is a /32 or /128)."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise UsageError(f"trusted_proxies: {entry!r} is not an IP address or CIDR network") from None
    return tuple(networks)


#: Why a client that connected straight from a trusted address is refused (sent to it, and logged).
DIRECT_CLIENT_REASON = (
    "the server expects a PROXY protocol header from this address (it is in the server's trusted_proxies): "
    "connect through the load balancer, or remove the address from trusted_proxies"
)
#: A TLS record: alert (21), legacy version 3.3, 2 bytes: fatal (2), access_denied (49).
_TLS_ACCESS_DENIED = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49])


def _goaway_frame() -> bytes:
    writer = FrameWriter(MAX_HEADER_SIZE)
    writer.write(GoAway(0, int(Status.FAILED_PRECONDITION), DIRECT_CLIENT_REASON))
    return bytes(writer.buffer)


_GOAWAY_FRAME = _goaway_frame()


class DirectClientAnswer(NamedTuple):
    """What a trusted connection sent instead of a header, and the fixed bytes that tell it why it is refused."""

    sent: str
    answer: bytes
    #: The answer, in words (for the log).
    told: str


_TLS_ANSWER = DirectClientAnswer("a TLS ClientHello", _TLS_ACCESS_DENIED, "a TLS access_denied alert")
_BASTION_ANSWER = DirectClientAnswer("a bastion Hello", _GOAWAY_FRAME, "a FAILED_PRECONDITION GoAway")


def direct_client_answer(data: bytes) -> DirectClientAnswer | None:
    """The answer for a trusted connection whose first bytes, ``data``, are not a PROXY header; None when
    they start like neither a TLS handshake record nor a bastion Hello frame (closed without a word).

    Looks at the first 6 bytes at most, against fixed patterns: a TLS record of type handshake (22) and
    version 3.x; a frame length under 64 KiB followed by a MessagePack array of 3 to 15 items whose first
    is Hello's tag (1).
    """
    if len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03 and data[2] <= 0x04:
        return _TLS_ANSWER
    if len(data) >= 6 and data[:2] == b"\x00\x00" and data[2:4] != b"\x00\x00" and 0x93 <= data[4] <= 0x9F:
        return _BASTION_ANSWER if data[5] == 0x01 else None
    return None
