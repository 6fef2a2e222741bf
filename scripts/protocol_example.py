#!/usr/bin/env python
"""The worked example of docs/protocol.md (section 11), produced by the real codec.

Every byte shown in that section comes from here. The messages are bastion's
own structs (``bastion.protocol.messages``), framed by
``bastion.protocol.frames.FrameWriter``; the same exchange is then replayed
through a client and a server ``bastion.protocol.connection.Connection`` to
prove that the sans-IO core emits exactly these bytes and accepts them. The
annotations are derived by walking the MessagePack bytes, not typed by hand.

    python scripts/protocol_example.py            print the generated block
    python scripts/protocol_example.py --write    splice it into docs/protocol.md
    python scripts/protocol_example.py --check    exit 1 if docs/protocol.md is stale

tests/docs/test_protocol_example.py runs the same checks, so the document
cannot drift from the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec

from bastion.protocol.connection import Connection, ProtocolLimits
from bastion.protocol.frames import HEADER_SIZE, FrameWriter
from bastion.protocol.messages import (
    PROTOCOL_VERSION,
    Call,
    Hello,
    Message,
    Result,
    Welcome,
)
from bastion.protocol.state import ConnectionState, Role

__all__ = [
    "BEGIN_MARKER",
    "DOC_PATH",
    "END_MARKER",
    "Frame",
    "check_doc",
    "example_frames",
    "extract_block",
    "render_block",
    "replay",
    "short_form_call",
    "splice",
]

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
BEGIN_MARKER = "<!-- BEGIN GENERATED protocol_example: scripts/protocol_example.py --write; do not edit -->"
END_MARKER = "<!-- END GENERATED protocol_example -->"

_LIMITS = ProtocolLimits()  # both ends run with the defaults in this example
_BYTES_PER_LINE = 16

#: The exchange of section 11, in the order the frames travel.
EXCHANGE: tuple[tuple[Role, Message], ...] = (
    (
        Role.CLIENT,
        Hello(
            version=PROTOCOL_VERSION,
            client="example/1.0",
            token="tok_example",
            window=_LIMITS.window,
            max_frame=_LIMITS.max_frame,
        ),
    ),
    (
        Role.SERVER,
        Welcome(
            version=PROTOCOL_VERSION,
            server="bastion/0.1.0",
            principal="example",
            max_frame=_LIMITS.max_frame,
            max_inflight=_LIMITS.max_inflight,
            window=_LIMITS.window,
            ping_interval_ms=30_000,
        ),
    ),
    # Raw fields take any encodable value; the encoder writes it in place.
    (Role.CLIENT, Call(id=1, method="admin.health", args={})),  # type: ignore[arg-type]
    (Role.SERVER, Result(id=1, value={"status": "ok"})),  # type: ignore[arg-type]
    (Role.CLIENT, Call(id=2, method="greeter.hello", args={"name": "Ada"})),  # type: ignore[arg-type]
    (Role.SERVER, Result(id=2, value="Hello, Ada!")),  # type: ignore[arg-type]
)

#: Short meanings appended to a field's annotation.
_GLOSS: dict[tuple[str, str], str] = {
    ("Hello", "version"): "highest version the client speaks",
    ("Hello", "token"): "credentials",
    ("Hello", "window"): "items per call the client accepts",
    ("Hello", "max_frame"): "client's receive limit (1 MiB)",
    ("Welcome", "version"): "version this connection speaks",
    ("Welcome", "principal"): "who the token authenticated as",
    ("Welcome", "max_frame"): "server's receive limit (1 MiB)",
    ("Welcome", "max_inflight"): "calls the client may have open",
    ("Welcome", "window"): "items per call the server accepts",
    ("Welcome", "ping_interval_ms"): "server pings after 30 s idle",
    ("Call", "timeout_ms"): "no deadline",
    ("Call", "priority"): "the method's default",
    ("Call", "stream"): "no client stream follows",
    ("Call", "metadata"): "none",
}


@dataclass(frozen=True)
class Frame:
    """One frame of the example, as it travels."""

    number: int
    sender: Role
    message: Message
    data: bytes  # length prefix + body
    offset: int  # where the frame starts in its direction's byte stream

    @property
    def body(self) -> bytes:
        return self.data[HEADER_SIZE:]

    @property
    def direction(self) -> str:
        return "client -> server" if self.sender is Role.CLIENT else "server -> client"


def example_frames() -> list[Frame]:
    """The frames of the exchange, each encoded by a ``FrameWriter``."""
    writers = {role: FrameWriter(_LIMITS.max_frame) for role in Role}
    offsets = dict.fromkeys(Role, 0)
    frames = []
    for number, (sender, message) in enumerate(EXCHANGE, 1):
        writer = writers[sender]
        writer.write(message)
        data = writer.take()
        frames.append(Frame(number, sender, message, data, offsets[sender]))
        offsets[sender] += len(data)
    return frames


def short_form_call() -> bytes:
    """Frame 3 again, with the trailing fields that equal their defaults left out.

    bastion's encoder writes every field, but a receiver must accept this
    shorter form too (section 3); ``replay`` proves the server core does.
    """
    body = msgspec.msgpack.encode([3, 1, "admin.health", {}])
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def _fail(message: str) -> None:
    raise AssertionError(message)


def replay(frames: list[Frame]) -> None:
    """Run the exchange through a client and a server ``Connection``.

    Raises AssertionError unless each end's core emits exactly the bytes of
    each frame and the other end accepts them as the same message.
    """
    ends = {role: Connection(role, _LIMITS) for role in Role}
    encoder = msgspec.msgpack.Encoder()
    for frame in frames:
        sender = ends[frame.sender]
        receiver = ends[Role.SERVER if frame.sender is Role.CLIENT else Role.CLIENT]
        message = frame.message
        if isinstance(message, Hello):
            sender.send_hello(message)
        elif isinstance(message, Welcome):
            sender.send_welcome(message)
        elif isinstance(message, Call):
            call_id = sender.send_call(
                message.method,
                message.args,
                timeout_ms=message.timeout_ms,
                priority=message.priority,
                stream=message.stream,
                metadata=message.metadata,
            )
            if call_id != message.id:
                _fail(f"frame {frame.number}: the core chose call id {call_id}, not {message.id}")
        elif isinstance(message, Result):
            if not sender.send_result(message.id, message.value):
                _fail(f"frame {frame.number}: call {message.id} was not open")
        else:  # pragma: no cover - the exchange holds nothing else
            _fail(f"frame {frame.number}: no replay for {type(message).__name__}")
        sent = sender.data_to_send()
        if sent != frame.data:
            _fail(f"frame {frame.number}: the core sent {sent.hex(' ')}, not {frame.data.hex(' ')}")
        events = receiver.receive_data(sent)
        if len(events) != 1 or encoder.encode(events[0]) != frame.body:
            _fail(f"frame {frame.number}: the peer decoded {events!r}")
        if receiver.pending_output:
            _fail(f"frame {frame.number}: the peer wants to answer {receiver.data_to_send().hex(' ')}")
    for role, end in ends.items():
        if end.state is not ConnectionState.OPEN or end.open_calls:
            _fail(f"{role.value} ended {end.state.value} with {end.open_calls} open calls")
    # The short form of frame 3 means the same Call to a fresh server.
    server = Connection(Role.SERVER, _LIMITS)
    server.receive_data(frames[0].data)
    server.send_welcome(frames[1].message)  # type: ignore[arg-type]
    server.data_to_send()
    [call] = server.receive_data(short_form_call())
    if encoder.encode(call) != frames[2].body:
        _fail(f"the short form decoded to {call!r}")


# -- annotation ---------------------------------------------------------------


def _header(first: int) -> tuple[str, str, int]:
    """(family, format name, size of the value's length/payload field) for a first byte.

    family is one of int, nil, bool, float, str, bin, array, map.
    """
    if first <= 0x7F:
        return "int", "positive fixint", 0
    if first <= 0x8F:
        return "map", "fixmap", 0
    if first <= 0x9F:
        return "array", "fixarray", 0
    if first <= 0xBF:
        return "str", "fixstr", 0
    if first >= 0xE0:
        return "int", "negative fixint", 0
    table = {
        0xC0: ("nil", "nil", 0),
        0xC2: ("bool", "false", 0),
        0xC3: ("bool", "true", 0),
        0xC4: ("bin", "bin8", 1),
        0xC5: ("bin", "bin16", 2),
        0xC6: ("bin", "bin32", 4),
        0xCA: ("float", "float32", 4),
        0xCB: ("float", "float64", 8),
        0xCC: ("int", "uint8", 1),
        0xCD: ("int", "uint16", 2),
        0xCE: ("int", "uint32", 4),
        0xCF: ("int", "uint64", 8),
        0xD0: ("int", "int8", 1),
        0xD1: ("int", "int16", 2),
        0xD2: ("int", "int32", 4),
        0xD3: ("int", "int64", 8),
        0xD9: ("str", "str8", 1),
        0xDA: ("str", "str16", 2),
        0xDB: ("str", "str32", 4),
        0xDC: ("array", "array16", 2),
        0xDD: ("array", "array32", 4),
        0xDE: ("map", "map16", 2),
        0xDF: ("map", "map32", 4),
    }
    if first not in table:
        raise ValueError(f"the example does not annotate MessagePack byte 0x{first:02x}")
    return table[first]


@dataclass
class _Token:
    start: int  # offset in the body
    end: int
    text: str


def _scan(body: bytes, pos: int, label: str, depth: int, out: list[_Token], gloss: str = "") -> int:
    """Annotate the value at ``body[pos]``; return the offset after it."""
    first = body[pos]
    family, fmt, size = _header(first)
    indent = "  " * depth
    arg = int.from_bytes(body[pos + 1 : pos + 1 + size], "big") if size else 0
    if family in ("array", "map"):
        count = arg if size else first & 0x0F
        noun = ("element", "elements") if family == "array" else ("entry", "entries")
        text = f"{indent}{label}{family}, {count} {noun[count != 1]} ({fmt})"
        out.append(_Token(pos, pos + 1 + size, text + (f" - {gloss}" if gloss else "")))
        pos += 1 + size
        for index in range(count):
            if family == "array":
                pos = _scan(body, pos, f"[{index}] ", depth + 1, out)
            else:
                pos = _scan(body, pos, "key ", depth + 1, out)
                pos = _scan(body, pos, "value ", depth + 1, out)
        return pos
    if family in ("str", "bin"):
        length = arg if size else first & 0x1F
        end = pos + 1 + size + length
        raw = body[pos + 1 + size : end]
        shown = json.dumps(raw.decode("utf-8")) if family == "str" else f"<{length} bytes>"
        detail = f"{fmt}, {length} byte{'s' if length != 1 else ''}"
    else:
        end = pos + 1 + size
        value = msgspec.msgpack.decode(body[pos:end])
        shown = json.dumps(value) if value is not None else "nil"
        detail = fmt
    text = f"{indent}{label}{shown}" + (f" ({detail})" if detail != shown else "") + (f" - {gloss}" if gloss else "")
    out.append(_Token(pos, end, text))
    return end


def _annotate(frame: Frame) -> list[_Token]:
    """Tokens of a frame's bytes, offsets relative to the frame's start."""
    body = frame.body
    name = type(frame.message).__name__
    fields = type(frame.message).__struct_fields__
    out = [_Token(0, HEADER_SIZE, f"length prefix: body is {len(body)} bytes")]
    tokens: list[_Token] = []
    family, fmt, size = _header(body[0])
    count = int.from_bytes(body[1 : 1 + size], "big") if size else body[0] & 0x0F
    if family != "array":
        raise ValueError(f"frame {frame.number}: the body is not an array")
    tokens.append(_Token(0, 1 + size, f"array, {count} elements ({fmt}): type code + {count - 1} fields"))
    pos = 1 + size
    for index in range(count):
        if index == 0:
            label, gloss = "[0] type code = ", name
            tokens.append(_Token(pos, pos + 1, f"{label}{body[pos]} ({_header(body[pos])[1]}) - {gloss}"))
            pos += 1
            continue
        field = fields[index - 1]
        pos = _scan(body, pos, f"[{index}] {field} = ", 0, tokens, _GLOSS.get((name, field), ""))
    if pos != len(body):
        raise ValueError(f"frame {frame.number}: {len(body) - pos} bytes left after the array")
    out += [_Token(t.start + HEADER_SIZE, t.end + HEADER_SIZE, t.text) for t in tokens]
    return out


def _dump(frame: Frame, title: str, width: int) -> list[str]:
    """``title``, then one line per token: offset, up to ``width`` hex bytes, meaning."""
    lines = [title]
    for token in _annotate(frame):
        chunk = frame.data[token.start : token.end]
        for i in range(0, len(chunk), width):
            part = chunk[i : i + width].hex(" ")
            text = token.text if i == 0 else ""
            offset = frame.offset + token.start + i
            lines.append(f"{offset:04x}  {part:<{width * 3 - 1}}  {text}".rstrip())
    return lines


def _width(frames: list[Frame]) -> int:
    """Bytes per hex column: the longest token, so most fit on one line, at most 16."""
    longest = max(t.end - t.start for frame in frames for t in _annotate(frame))
    return min(longest, _BYTES_PER_LINE)


def render_block() -> str:
    """The generated part of section 11: a fenced block of annotated hex dumps."""
    frames = example_frames()
    replay(frames)
    # The short form of frame 3 starts where frame 3 does: it is an alternative to it.
    alt = Frame(3, Role.CLIENT, frames[2].message, short_form_call(), frames[2].offset)
    width = _width([*frames, alt])
    lines = [
        "Offsets are hex, counted from the first byte after the TLS handshake,",
        "separately for each direction (client -> server, server -> client).",
        "",
    ]
    for frame in frames:
        title = (
            f"Frame {frame.number}: {frame.direction}, {type(frame.message).__name__} "
            f"({HEADER_SIZE} + {len(frame.body)} bytes)"
        )
        lines += [*_dump(frame, title, width), ""]
    title = (
        f"Frame 3, short form (equally valid: trailing defaults omitted): "
        f"{alt.direction}, Call ({HEADER_SIZE} + {len(alt.body)} bytes)"
    )
    lines += _dump(alt, title, width)
    return "```text\n" + "\n".join(lines) + "\n```"


# -- the document -------------------------------------------------------------


def extract_block(doc: str) -> str:
    """The text between the markers (without them), stripped of surrounding blank lines."""
    start = doc.index(BEGIN_MARKER) + len(BEGIN_MARKER)
    end = doc.index(END_MARKER, start)
    return doc[start:end].strip("\n")


def splice(doc: str, block: str) -> str:
    """``doc`` with the text between the markers replaced by ``block``."""
    start = doc.index(BEGIN_MARKER) + len(BEGIN_MARKER)
    end = doc.index(END_MARKER, start)
    return doc[:start] + "\n" + block + "\n" + doc[end:]


def check_doc(path: Path = DOC_PATH) -> bool:
    return extract_block(path.read_text(encoding="utf-8")) == render_block()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="update the example in docs/protocol.md")
    group.add_argument("--check", action="store_true", help="exit 1 if docs/protocol.md is stale")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="the document (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.write:
        doc = args.doc.read_text(encoding="utf-8")
        args.doc.write_text(splice(doc, render_block()), encoding="utf-8")
        return 0
    if args.check:
        if check_doc(args.doc):
            return 0
        print(f"{args.doc}: the worked example is stale; run {Path(__file__).name} --write", file=sys.stderr)
        return 1
    print(render_block())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
