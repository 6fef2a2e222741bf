"""Stateful fuzzing of a live server: random interleavings of good and bad frames on several connections.

A hypothesis ``RuleBasedStateMachine`` drives a real ``bastion serve`` (TLS,
real TCP) through raw sockets: handshakes good and bad, calls to every
built-in service (kv, messages, files, jobs, auth, admin) and the demo one
with valid arguments and with arguments of every wrong type, server and
client streams with their Items, Ends, Credits and Cancels, on open,
finished and never-opened ids, duplicate ids, oversized, empty and garbage
frames, frames cut short, pings, and connections dropped mid-call.

The model knows what each input deserves (section 5 of docs/protocol.md):
every call is answered by exactly one Result or Error, within a deadline,
never with UNKNOWN or INTERNAL; a frame on a call already finished is
ignored; a protocol error is answered by a GoAway with a non-OK code and a
close, and only a protocol error is. Where the wire makes the outcome a race
(an Item on a call the server may have just answered), either is accepted.
After each run, once every connection is gone, the server must hold no
connection, call, stream buffer or scheduler slot, must have counted no
internal error and logged no traceback, and must still answer a good client.

CI runs a few short runs (seconds); ``-m slow`` runs many long ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bastion import Client
from bastion.protocol.frames import FrameReader
from bastion.protocol.messages import Credit, Error, GoAway, Item, Ping, Pong, Result, ServerMessage, Welcome
from bastion.security.tls import client_context
from bastion.status import Status
from tests.support.server import ServerProcess

HELLO, CALL, CANCEL, ITEM, END, CREDIT, PING, GOAWAY = 1, 3, 6, 7, 8, 9, 10, 12
MAX_PEERS = 4
ANSWER_DEADLINE = 10.0  # every call that should finish does within this
CLOSE_DEADLINE = 5.0  # a protocol error closes the connection within this
CALL_TIMEOUT = 5.0  # every call's timeout_ms
#: Answers a call must never get: they mean an unexpected exception in the server.
BAD_CODES = {Status.UNKNOWN, Status.INTERNAL, Status.OK}
#: What the runs saw (results, error codes, protocol closes): printed by the full-size run.
TALLY: Counter[str] = Counter()
FUZZ_CONFIG = "[rate_limits]\nper_principal = { rate = 50000, burst = 50000 }\n"

# -- what to call --------------------------------------------------------------------------------

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.binary(max_size=12),
)
values = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
names = st.sampled_from(["k", "a/b", "", "x" * 300, "\x00", "soak.1", "*", ">", "a..b", "fuzz.>", "ü"])

#: method -> (shape, parameter names, valid-ish arguments). Left out: auth.logout and the admin's own
#: user and token changes (they would lock the run out), admin.backup (slow, disk), demo.fail (INTERNAL by design),
#: and the demo methods that sleep as long as an argument says.
UNARY, SERVER_STREAM, CLIENT_STREAM = "unary", "server", "client"
METHODS: dict[str, tuple[str, st.SearchStrategy[dict[str, Any]]]] = {
    "admin.health": (UNARY, st.just({})),
    "admin.ready": (UNARY, st.just({})),
    "admin.methods": (UNARY, st.just({})),
    "admin.stats": (UNARY, st.just({})),
    "admin.backups": (UNARY, st.just({})),
    "auth.whoami": (UNARY, st.just({})),
    "auth.list_users": (UNARY, st.just({})),
    "auth.list_tokens": (UNARY, st.fixed_dictionaries({}, optional={"user": names})),
    "auth.create_user": (
        UNARY,
        st.fixed_dictionaries({"name": names}, optional={"roles": st.lists(names, max_size=2)}),
    ),
    "auth.login": (UNARY, st.fixed_dictionaries({"username": names, "password": names})),
    "kv.get": (UNARY, st.fixed_dictionaries({"key": names}, optional={"namespace": names})),
    "kv.get_many": (UNARY, st.fixed_dictionaries({"keys": st.lists(names, max_size=3)})),
    "kv.put": (
        UNARY,
        st.fixed_dictionaries(
            {"key": names, "value": st.binary(max_size=20)}, optional={"expected_version": st.integers(-2, 5)}
        ),
    ),
    "kv.put_many": (
        UNARY,
        st.fixed_dictionaries(
            {"items": st.lists(st.fixed_dictionaries({"key": names, "value": st.binary(max_size=8)}), max_size=3)}
        ),
    ),
    "kv.delete": (UNARY, st.fixed_dictionaries({"key": names}, optional={"expected_version": st.integers(-2, 5)})),
    "kv.list": (
        UNARY,
        st.fixed_dictionaries({}, optional={"prefix": names, "limit": st.integers(-2, 5), "after": names}),
    ),
    "kv.usage": (UNARY, st.fixed_dictionaries({}, optional={"namespace": names})),
    "kv.namespaces": (UNARY, st.just({})),
    "kv.create_namespace": (UNARY, st.fixed_dictionaries({"name": names})),
    "kv.delete_namespace": (UNARY, st.fixed_dictionaries({"name": names})),
    "kv.watch": (
        SERVER_STREAM,
        st.fixed_dictionaries({}, optional={"prefix": names, "from_version": st.integers(-2, 5)}),
    ),
    "files.begin_upload": (
        UNARY,
        st.fixed_dictionaries(
            {"size": st.integers(-2, 64), "sha256": st.sampled_from(["", "0" * 64, "zz"])}, optional={"name": names}
        )
        | st.builds(
            lambda body, name, overwrite: {
                "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "name": name,
                "overwrite": overwrite,
            },
            st.sampled_from([b"", b"a" * 10, b"fuzz" * 16]),
            names,
            st.booleans(),
        ),
    ),
    "files.upload": (
        CLIENT_STREAM,
        st.fixed_dictionaries({"upload_id": names}, optional={"offset": st.integers(-2, 5)}),
    ),
    "files.upload_status": (UNARY, st.fixed_dictionaries({"upload_id": names})),
    "files.uploads": (UNARY, st.fixed_dictionaries({}, optional={"limit": st.integers(-2, 5), "after": names})),
    "files.cancel_upload": (UNARY, st.fixed_dictionaries({"upload_id": names})),
    "files.stat": (UNARY, st.fixed_dictionaries({}, optional={"file_id": names, "name": names, "owner": names})),
    "files.list": (
        UNARY,
        st.fixed_dictionaries({}, optional={"prefix": names, "limit": st.integers(-2, 5), "all": st.booleans()}),
    ),
    "files.delete": (UNARY, st.fixed_dictionaries({}, optional={"file_id": names, "name": names})),
    "files.rename": (UNARY, st.fixed_dictionaries({"new_name": names}, optional={"file_id": names, "name": names})),
    "files.share": (
        UNARY,
        st.fixed_dictionaries({}, optional={"name": names, "user": names, "role": names, "mode": names}),
    ),
    "files.shares": (UNARY, st.fixed_dictionaries({}, optional={"name": names})),
    "files.usage": (UNARY, st.fixed_dictionaries({}, optional={"user": names})),
    "jobs.submit": (
        UNARY,
        st.fixed_dictionaries({"name": names}, optional={"args": st.dictionaries(names, leaf, max_size=2)}),
    ),
    "jobs.status": (UNARY, st.fixed_dictionaries({"id": names})),
    "jobs.list": (
        UNARY,
        st.fixed_dictionaries({}, optional={"state": names, "limit": st.integers(-2, 5), "after": names}),
    ),
    "jobs.cancel": (UNARY, st.fixed_dictionaries({"id": names})),
    "jobs.result": (UNARY, st.fixed_dictionaries({"id": names})),
    "jobs.watch": (SERVER_STREAM, st.fixed_dictionaries({"id": names})),
    "jobs.registered": (UNARY, st.just({})),
    "messages.send": (
        UNARY,
        st.fixed_dictionaries(
            {"to": st.lists(names, max_size=2)},
            optional={"subject": names, "body": st.binary(max_size=8), "data": leaf},
        ),
    ),
    "messages.inbox": (
        UNARY,
        st.fixed_dictionaries({}, optional={"limit": st.integers(-2, 5), "cursor": st.integers(-2, 5)}),
    ),
    "messages.read": (UNARY, st.fixed_dictionaries({"id": st.integers(-2, 5)})),
    "messages.mark": (UNARY, st.fixed_dictionaries({"ids": st.lists(st.integers(-2, 5), max_size=3)})),
    "messages.delete": (UNARY, st.fixed_dictionaries({"ids": st.lists(st.integers(-2, 5), max_size=3)})),
    "messages.unread": (UNARY, st.just({})),
    "messages.watch": (SERVER_STREAM, st.fixed_dictionaries({}, optional={"from_id": st.integers(-2, 5)})),
    "messages.publish": (UNARY, st.fixed_dictionaries({"topic": names, "payload": leaf})),
    "messages.subscribe": (
        SERVER_STREAM,
        st.fixed_dictionaries({"pattern": names}, optional={"from_offset": st.integers(-2, 5)}),
    ),
    "messages.topic_info": (UNARY, st.fixed_dictionaries({"topic": names})),
    "demo.echo": (UNARY, st.fixed_dictionaries({"value": values})),
    "demo.echo_str": (UNARY, st.fixed_dictionaries({"value": st.text(max_size=8)})),
    "demo.echo_int": (UNARY, st.fixed_dictionaries({"value": st.integers(-5, 5)})),
    "demo.length": (UNARY, st.fixed_dictionaries({"text": st.text(max_size=8)})),
    "demo.count": (SERVER_STREAM, st.fixed_dictionaries({"n": st.integers(-1, 40)})),
    "demo.take": (CLIENT_STREAM, st.fixed_dictionaries({}, optional={"fail_after": st.integers(0, 3)})),
}
#: Wrong arguments: a method's own parameter names (and strangers) with values of any type.
wrong_args = st.dictionaries(
    st.sampled_from(
        [
            "key",
            "value",
            "name",
            "id",
            "n",
            "ids",
            "items",
            "to",
            "pattern",
            "size",
            "upload_id",
            "limit",
            "namespace",
            "args",
            "topic",
            "x",
        ]
    ),
    values,
    max_size=4,
)
credits = st.integers(-1, 3) | st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63)])
call_options = st.tuples(
    st.none() | st.integers(-5, 50) | st.sampled_from([2**31, 2**63 - 1, 2**64 - 1, -(2**63)]),
    st.none() | st.integers(-(2**63), 2**64 - 1),
    st.none()
    | st.dictionaries(
        st.sampled_from(["idempotency-key", "bastion-x", "traceparent", "", "x" * 300]),
        st.text(max_size=8) | st.sampled_from(["k1", "k2", "x" * 201]),
        max_size=2,
    ),
)
not_a_map = st.one_of(
    st.none(), st.integers(-(2**63), 2**63), st.text(max_size=4), st.lists(leaf, max_size=2), st.binary(max_size=4)
)


def code_name(code: int) -> str:
    return Status(code).name if code in set(Status) else str(code)


def frame(message: Any) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


# -- a raw connection and what it expects ----------------------------------------------------------


@dataclass
class Call:
    shape: str
    method: str
    stream: bool  # the Call's stream flag as sent
    credit: int = 0  # items we may still send (a client stream)
    ended: bool = False
    timeout_ms: int | None = None
    sent_at: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        """Whether the server owes the answer by now (a call with a deadline of 5 s or less, past it)."""
        timeout = self.timeout_ms
        if (
            timeout is not None
            and timeout <= CALL_TIMEOUT * 1000
            and time.monotonic() - self.sent_at > timeout / 1000 + 3
        ):
            return True
        mismatched = self.stream != (self.shape == CLIENT_STREAM)
        return self.shape == UNARY or self.method == "demo.count" or mismatched or (self.stream and self.ended)


@dataclass
class Peer:
    sock: socket.socket
    name: str
    reader: FrameReader[Any] = field(default_factory=lambda: FrameReader(ServerMessage, 1 << 24))
    welcome: Welcome | None = None
    next_id: int = 1
    calls: dict[int, Call] = field(default_factory=dict)  # sent and not yet answered
    finished: set[int] = field(default_factory=set)  # answered, or cancelled by us
    cancelled: set[int] = field(default_factory=set)
    doomed: str = ""  # the protocol error we sent: a GoAway (non-OK) and a close must follow
    maybe_doomed: bool = False  # a frame whose fate is a race: a protocol close is allowed
    goaway: GoAway | None = None
    closed: bool = False
    sent_goaway: bool = False
    uploads: list[str] = field(default_factory=list)  # shared by the run's peers

    @property
    def usable(self) -> bool:
        return not (self.closed or self.doomed or self.maybe_doomed or self.sent_goaway) and self.welcome is not None

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def pump(self, timeout: float) -> None:
        """Read and check what the server sent, for up to ``timeout`` seconds (less once nothing is pending)."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            remaining = deadline - time.monotonic()
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
            if remaining <= 0 and not pending:
                return
            self.sock.settimeout(max(remaining, 0.001))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                chunk = b""
            if not chunk:
                self.closed = True
                assert self.doomed or self.maybe_doomed or self.sent_goaway or self.goaway, (
                    f"{self.name}: the server closed a connection that broke no rule, without a GoAway"
                )
                return
            for message in self.reader.feed(chunk):
                self.receive(message)

    def receive(self, message: Any) -> None:
        if isinstance(message, Result | Error):
            if message.id in self.cancelled:
                return  # crossed our Cancel
            assert message.id in self.calls, f"{self.name}: answer for call {message.id} that is not open: {message}"
            call = self.calls.pop(message.id)
            self.finished.add(message.id)
            TALLY["result" if isinstance(message, Result) else f"error {code_name(message.code)}"] += 1
            if isinstance(message, Result) and call.method == "files.begin_upload":
                self.uploads.append(msgspec.msgpack.decode(message.value)["upload_id"])
            if isinstance(message, Error):
                assert message.code not in BAD_CODES, f"{self.name}: {call.method} answered {message}"
                assert message.code in set(Status), message
        elif isinstance(message, Item):
            if message.id in self.cancelled:
                return
            call = self.calls.get(message.id)
            assert call is not None, f"{self.name}: item for call {message.id} that is not open"
            assert call.shape == SERVER_STREAM, f"{self.name}: item on a {call.shape} call {call.method}"
            self.send(frame([CREDIT, message.id, 1]))
        elif isinstance(message, Credit):
            assert message.n >= 1, message
            call = self.calls.get(message.id)
            if call is not None:
                call.credit += message.n
        elif isinstance(message, Ping):
            self.send(frame([11, message.payload]))
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, Welcome) and self.welcome is None:
            self.welcome = message  # a fuzzed Hello that happened to be a valid one
        elif isinstance(message, GoAway):
            assert message.code != Status.OK or self.sent_goaway, f"{self.name}: unexpected graceful GoAway {message}"
            if message.code != Status.OK:
                assert self.doomed or self.maybe_doomed, f"{self.name}: GoAway for nothing wrong: {message}"
                TALLY[f"goaway {code_name(message.code)}"] += 1
            self.goaway = message
        else:
            raise AssertionError(f"{self.name}: unexpected {message}")


class LiveServerFuzz(RuleBasedStateMachine):
    server: ServerProcess  # set by the test before the run
    context: ssl.SSLContext

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[Peer] = []
        self.made = 0
        self.uploads: list[str] = []  # upload ids files.begin_upload answered

    def connect(self, token: str | None) -> Peer:
        raw = socket.create_connection((self.server.host, self.server.port), timeout=5)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.context.wrap_socket(raw, server_hostname=self.server.host)
        self.made += 1
        peer = Peer(sock, f"peer{self.made}", uploads=self.uploads)
        self.peers.append(peer)
        return peer

    def usable(self) -> list[Peer]:
        return [p for p in self.peers if p.usable]

    # -- connections --

    @initialize()
    def admin_connection(self) -> None:
        self.open_connection(anonymous=False)

    @precondition(lambda self: len(self.peers) < MAX_PEERS)
    @rule(anonymous=st.sampled_from([False, False, True]))
    def open_connection(self, anonymous: bool) -> None:
        token = None if anonymous else self.server.token
        peer = self.connect(token)
        peer.send(frame([HELLO, 1, "fuzz/1", token, 4, 1 << 20, {}]))
        deadline = time.monotonic() + ANSWER_DEADLINE
        while peer.welcome is None:
            assert time.monotonic() < deadline, f"{peer.name}: no Welcome"
            peer.sock.settimeout(deadline - time.monotonic())
            chunk = peer.sock.recv(65536)
            assert chunk, f"{peer.name}: closed instead of a Welcome"
            messages = peer.reader.feed(chunk)
            if messages:
                assert isinstance(messages[0], Welcome), messages
                peer.welcome = messages[0]
                for message in messages[1:]:
                    peer.receive(message)

    @precondition(lambda self: len(self.peers) < MAX_PEERS)
    @rule(
        hello=st.one_of(
            st.builds(
                lambda *f: [HELLO, *f],
                st.integers(-1, 3),
                st.text(max_size=4) | st.integers(-(2**63), 2**63),
                st.none(),
                st.integers(-1, 2**32),
                st.integers(-1, 2**33),
            ),
            st.lists(leaf, max_size=8),
            st.just([CALL, 1, "admin.health", {}]),
        )
    )
    def bad_handshake(self, hello: list[Any]) -> None:
        """A first frame that is no acceptable Hello is refused with a GoAway; a valid one is welcomed."""
        peer = self.connect(None)
        peer.maybe_doomed = True
        peer.send(frame(hello))
        peer.pump(0.3)
        if peer.goaway is not None:
            assert peer.goaway.code != Status.OK

    @precondition(lambda self: bool(self.peers))
    @rule(data=st.data())
    def drop_connection(self, data: st.DataObject) -> None:
        peer = data.draw(st.sampled_from(self.peers))
        with contextlib.suppress(OSError):
            peer.sock.close()
        self.peers.remove(peer)

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), length=st.integers(2, 200), sent=st.integers(0, 1))
    def truncated_frame_then_drop(self, data: st.DataObject, length: int, sent: int) -> None:
        peer = data.draw(st.sampled_from(self.usable()))
        peer.send(length.to_bytes(4, "big") + b"\x93" * min(sent, length - 1))
        peer.sock.close()
        self.peers.remove(peer)

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data())
    def client_goaway(self, data: st.DataObject) -> None:
        peer = data.draw(st.sampled_from(self.usable()))
        peer.sent_goaway = True
        peer.send(frame([GOAWAY, 0, 0, "bye"]))

    # -- calls --

    def start(
        self, peer: Peer, method: str, args: Any, stream: bool | None = None, options: tuple[Any, ...] = ()
    ) -> int:
        shape = METHODS[method][0] if method in METHODS else UNARY
        call_id = peer.next_id
        peer.next_id += 1
        flag = shape == CLIENT_STREAM if stream is None else stream
        assert peer.welcome is not None
        timeout_ms, priority, metadata = options or (int(CALL_TIMEOUT * 1000), None, None)
        peer.calls[call_id] = Call(shape, method, flag, credit=peer.welcome.window, timeout_ms=timeout_ms)
        peer.send(frame([CALL, call_id, method, args, timeout_ms, priority, flag, metadata]))
        return call_id

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), method=st.sampled_from(sorted(METHODS)))
    def good_call(self, data: st.DataObject, method: str) -> None:
        peer = data.draw(st.sampled_from(self.usable()))
        self.start(peer, method, data.draw(METHODS[method][1]))

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), method=st.sampled_from(sorted(METHODS)), options=call_options)
    def call_with_odd_options(self, data: st.DataObject, method: str, options: tuple[Any, ...]) -> None:
        """Any timeout_ms, priority and metadata (a passed deadline is DEADLINE_EXCEEDED; priority never fails)."""
        peer = data.draw(st.sampled_from(self.usable()))
        self.start(peer, method, data.draw(METHODS[method][1]), options=options)

    @precondition(lambda self: bool(self.usable()) and bool(self.uploads))
    @rule(
        data=st.data(),
        chunks=st.lists(st.binary(max_size=48), max_size=4),
        offset=st.integers(-1, 80),
        end=st.booleans(),
    )
    def upload_to_a_real_upload(self, data: st.DataObject, chunks: list[bytes], offset: int, end: bool) -> None:
        """files.upload to an upload begun on this server (any offset), maybe two at once, maybe left unfinished."""
        peer = data.draw(st.sampled_from(self.usable()))
        upload_id = data.draw(st.sampled_from(self.uploads))
        call_id = self.start(peer, "files.upload", {"upload_id": upload_id, "offset": offset})
        call = peer.calls[call_id]
        for chunk in chunks[: call.credit]:
            call.credit -= 1
            peer.send(frame([ITEM, call_id, chunk]))
        if end:
            call.ended = True
            peer.send(frame([END, call_id]))

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), method=st.sampled_from(sorted(METHODS)), args=wrong_args | not_a_map, flip=st.booleans())
    def bad_call(self, data: st.DataObject, method: str, args: Any, flip: bool) -> None:
        """Arguments of the wrong shape or type, and sometimes the wrong stream flag: an Error, never a close."""
        peer = data.draw(st.sampled_from(self.usable()))
        shape = METHODS[method][0]
        self.start(peer, method, args, stream=(shape == CLIENT_STREAM) != flip)

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), method=st.text(max_size=20) | st.sampled_from(["kv.", ".get", "kv.get.x", "nope.x", "kv._x"]))
    def unknown_method(self, data: st.DataObject, method: str) -> None:
        assume(method not in METHODS and not method.startswith("demo.") and method not in ("auth.logout", "demo.fail"))
        peer = data.draw(st.sampled_from(self.usable()))
        self.start(peer, method, {})

    # -- stream frames on ids of every kind --

    def pick_id(self, data: st.DataObject, peer: Peer) -> int:
        unknown = st.sampled_from([0, -1, peer.next_id, peer.next_id + 5, 2**63 - 1])
        known = sorted(peer.calls) + sorted(peer.finished)
        if not known:
            return data.draw(unknown)
        return data.draw(st.sampled_from(known) | st.sampled_from(known) | st.sampled_from(known) | unknown)

    def classify(self, peer: Peer, call_id: int) -> str:
        if call_id <= 0 or call_id >= peer.next_id:
            return "unknown"
        if call_id in peer.finished:
            return "finished"
        return "open"

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), kind=st.sampled_from([ITEM, END, CREDIT, CANCEL]), n=credits, value=values)
    def stream_frame(self, data: st.DataObject, kind: int, n: int, value: Any) -> None:
        peer = data.draw(st.sampled_from(self.usable()))
        peer.pump(0.02)
        if not peer.usable:
            return
        call_id = self.pick_id(data, peer)
        state = self.classify(peer, call_id)
        message = {
            ITEM: [ITEM, call_id, value],
            END: [END, call_id],
            CREDIT: [CREDIT, call_id, n],
            CANCEL: [CANCEL, call_id],
        }
        if state == "unknown":
            peer.doomed = f"{kind} on unknown call {call_id}"
        elif kind == CREDIT and n < 1:
            peer.doomed = f"Credit {n} on call {call_id}"
            if state == "finished":
                peer.maybe_doomed, peer.doomed = True, ""  # ignored (5.3) or refused: either is fair
        elif state == "finished":
            pass  # silently ignored (5.3)
        else:
            call = peer.calls[call_id]
            if kind == CANCEL:
                del peer.calls[call_id]
                peer.finished.add(call_id)
                peer.cancelled.add(call_id)
            elif kind == CREDIT:
                pass
            elif not call.stream or call.ended or (kind == ITEM and call.credit <= 0):
                peer.maybe_doomed = True  # a protocol error, unless the server answered the call meanwhile
            elif kind == ITEM:
                call.credit -= 1
            else:
                call.ended = True
        peer.send(frame(message[kind]))

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), items=st.lists(st.binary(max_size=64), max_size=6), end=st.booleans())
    def upload_items(self, data: st.DataObject, items: list[bytes], end: bool) -> None:
        """A well-behaved client stream: items within credit, then maybe the End."""
        peer = data.draw(st.sampled_from(self.usable()))
        peer.pump(0.02)
        open_streams = [i for i, c in peer.calls.items() if c.stream and not c.ended and c.shape == CLIENT_STREAM]
        if not peer.usable or not open_streams:
            return
        call_id = data.draw(st.sampled_from(open_streams))
        call = peer.calls[call_id]
        for item in items[: call.credit]:
            call.credit -= 1
            peer.send(frame([ITEM, call_id, item]))
        if end:
            call.ended = True
            peer.send(frame([END, call_id]))

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), past=st.sampled_from([2**63, 2**64 - 1]))
    def bad_call_id(self, data: st.DataObject, past: int) -> None:
        """A Call reusing an id, or one past 2**63-1: a protocol error."""
        peer = data.draw(st.sampled_from(self.usable()))
        call_id = data.draw(st.integers(1, peer.next_id - 1)) if peer.next_id > 1 and data.draw(st.booleans()) else past
        peer.doomed = f"Call with id {call_id}"
        peer.send(frame([CALL, call_id, "admin.health", {}]))

    # -- frames no server should accept --

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), over=st.integers(1, 2**31))
    def oversized_frame(self, data: st.DataObject, over: int) -> None:
        peer = data.draw(st.sampled_from(self.usable()))
        assert peer.welcome is not None
        length = min(peer.welcome.max_frame + over, 2**32 - 1)
        peer.doomed = f"a frame of {length} bytes"
        peer.send(length.to_bytes(4, "big") + b"\x00" * 16)

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), body=st.binary(max_size=40) | st.lists(leaf, max_size=5).map(msgspec.msgpack.encode))
    def garbage_frame(self, data: st.DataObject, body: bytes) -> None:
        peer = data.draw(st.sampled_from(self.usable()))
        try:
            msgspec.msgpack.decode(body)
            decoded = msgspec.msgpack.decode(body, type=list)
            assume(not (decoded and decoded[0] in range(1, 13)))  # something that might be a message: not garbage
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        peer.doomed = f"garbage frame {body!r}"
        peer.send(len(body).to_bytes(4, "big") + body)

    @precondition(lambda self: bool(self.usable()))
    @rule(data=st.data(), payload=st.integers(0, 2**64 - 1))
    def ping(self, data: st.DataObject, payload: int) -> None:
        data.draw(st.sampled_from(self.usable())).send(frame([PING, payload]))

    # -- checks --

    @invariant()
    def calls_are_answered_and_errors_close(self) -> None:
        """Every open unary call is answered in time; a connection that broke a rule is closed in time."""
        deadline = time.monotonic() + ANSWER_DEADLINE
        for peer in list(self.peers):
            peer.pump(0.01)
            while not peer.closed and time.monotonic() < deadline:
                waiting = [i for i, c in peer.calls.items() if c.due()]
                if not waiting and not peer.doomed:
                    break
                peer.pump(0.05)
            if peer.doomed:
                peer.pump(max(0.0, min(CLOSE_DEADLINE, deadline - time.monotonic())))
                assert peer.closed, f"{peer.name}: not closed after {peer.doomed}"
                assert peer.goaway is not None and peer.goaway.code != Status.OK, (peer.doomed, peer.goaway)
            elif not peer.closed:
                waiting = {i: c.method for i, c in peer.calls.items() if c.due()}
                assert not waiting, f"{peer.name}: calls unanswered after {ANSWER_DEADLINE}s: {waiting}"
            if peer.closed:
                peer.sock.close()
                self.peers.remove(peer)

    def teardown(self) -> None:
        for peer in self.peers:
            with contextlib.suppress(OSError):
                peer.sock.close()
        settle(self.server)


def stats(server: ServerProcess) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        async with Client(server.address, token=server.token, timeout=10) as client:
            answer: dict[str, Any] = await client.admin.stats()
            assert await client.demo.echo(value="still here") == "still here"
            return answer

    return asyncio.run(ask())


def settle(server: ServerProcess) -> None:
    """Once every fuzzing connection is gone, the server holds nothing for them and saw no internal error."""
    deadline = time.monotonic() + 15
    while True:
        counts = stats(server)
        held = {
            name: counts[name]
            for name in (
                "connections",
                "calls_in_flight",
                "stream_buffer_bytes",
                "stream_buffer_paused",
                "scheduler_running",
                "scheduler_queued",
            )
            if counts[name] > (1 if name in ("connections", "calls_in_flight") else 0)
        }
        if not held:
            break
        assert time.monotonic() < deadline, f"the server still holds {held} after every fuzzing connection closed"
        time.sleep(0.05)
    assert counts["internal_errors_total"] == 0, counts
    log = server.log()
    assert "Traceback" not in log, log[-4000:]
    assert server.process.poll() is None, "the server exited"


def fuzzed(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, store: str | None = None
) -> Iterator[type[LiveServerFuzz]]:
    config = tmp_path / "fuzz.toml"
    config.write_text(FUZZ_CONFIG)
    server = server_factory({"BASTION_CONFIG": str(config), **({"BASTION_STORE": store} if store else {})})
    assert server.ca_file is not None
    LiveServerFuzz.server = server
    LiveServerFuzz.context = client_context(server.ca_file)
    yield LiveServerFuzz
    settle(server)


@pytest.fixture
def fuzz_server(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[type[LiveServerFuzz]]:
    """A server on its default store (SQLite)."""
    yield from fuzzed(server_factory, tmp_path)


@pytest.fixture
def fuzz_server_on(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, store_url: str
) -> Iterator[type[LiveServerFuzz]]:
    """A server on each store backend in turn (PostgreSQL text, unlike SQLite's, cannot hold NUL, say)."""
    yield from fuzzed(server_factory, tmp_path, store_url)


def test_random_interleavings_of_good_and_bad_frames(fuzz_server: type[LiveServerFuzz]) -> None:
    run_state_machine_as_test(
        fuzz_server,
        settings=settings(
            max_examples=15,
            stateful_step_count=40,
            deadline=timedelta(seconds=60),
            derandomize=True,
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    # The runs reached the services and the protocol's error paths, not only the handshake.
    assert TALLY["result"] and any(k.startswith("error") for k in TALLY) and any(k.startswith("goaway") for k in TALLY)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_interleavings_full_size(fuzz_server_on: type[LiveServerFuzz]) -> None:
    run_state_machine_as_test(
        fuzz_server_on,
        settings=settings(
            max_examples=150,
            stateful_step_count=60,
            deadline=timedelta(seconds=120),
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    print("live fuzz tally:", dict(TALLY.most_common()))
