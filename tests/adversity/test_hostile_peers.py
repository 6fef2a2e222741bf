"""Hostile peers against a real server on loopback TCP, found by a review of the protocol core.

Each test drives an in-process ``Server`` over real TCP with raw frames (a
client library would never send these), and checks the project's rules:
bad input gets a coded answer and loses nothing else, the server keeps
serving, and nothing is left behind. Anything asyncio would report as an
unhandled error (an exception out of a protocol callback, a task that died
with an exception nobody retrieved) fails the test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from bastion import Principal, Server, ServerLimits, Service
from bastion.exceptions import Unauthenticated
from bastion.protocol.messages import Call, Hello
from bastion.protocol.state import ConnectionState
from bastion.security.audit import AuditLog
from bastion.security.authn import PeerInfo, StaticTokens
from bastion.server.session import ServerSession
from bastion.status import Status

TOKEN = "bst_hostile-peer-review-token-0123456789ab"
ADA = Principal("ada", frozenset({"user"}))
HELLO, WELCOME, RESULT, ERROR, GOAWAY = 1, 2, 4, 5, 12
#: A MessagePack str of two bytes that are not UTF-8 (the frame decoder skips over ``Raw`` fields).
BAD_UTF8 = b"\xa2\xff\xfe"


def self_containing() -> list[Any]:
    """A value msgspec cannot encode: it raises RecursionError partway through."""
    value: list[Any] = [1, "two"]
    value.append(value)
    return value


def make_service() -> Service:
    svc = Service("hp")

    @svc.method
    async def echo(value: Any) -> Any:
        return value

    @svc.method
    async def shout(text: str) -> str:  # no await: runs inline
        return text.upper()

    @svc.method
    async def shout_in_task(text: str) -> str:
        await asyncio.sleep(0)
        return text.upper()

    @svc.method
    async def tangle() -> Any:  # no await: runs inline
        return self_containing()

    @svc.method
    async def tangle_in_task() -> Any:
        await asyncio.sleep(0)
        return self_containing()

    @svc.method
    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @svc.method
    async def join(parts: AsyncIterator[str]) -> str:
        return "".join([part async for part in parts])

    return svc


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def encode(message: object) -> bytes:
    return frame(msgspec.msgpack.encode(message))


class Raw:
    """A client speaking frames directly over TCP."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, server: Server, *, hello: bool = True) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        raw = cls(reader, writer)
        if hello:
            raw.send(encode(Hello(1, "hostile/1", TOKEN)))
            assert (await raw.read())[0] == WELCOME
        return raw

    def send(self, *frames: bytes) -> None:
        """All of ``frames`` in one write (one read, on loopback)."""
        self.writer.write(b"".join(frames))

    async def read(self, timeout: float = 5.0) -> list[Any]:
        async with asyncio.timeout(timeout):
            length = int.from_bytes(await self.reader.readexactly(4), "big")
            return msgspec.msgpack.decode(await self.reader.readexactly(length))  # type: ignore[no-any-return]

    async def answers_until(self, call_id: int) -> dict[int, list[Any]]:
        """Every answer (Result, Error) read up to and including ``call_id``'s, by call id."""
        answers: dict[int, list[Any]] = {}
        while call_id not in answers:
            message = await self.read()
            assert message[0] != GOAWAY, message
            if message[0] in (RESULT, ERROR):
                answers[message[1]] = message
        return answers

    async def closed(self, timeout: float = 5.0) -> list[list[Any]]:
        """Read until the server closes the connection; the messages read on the way."""
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    seen.append(await self.read(timeout))
                except (asyncio.IncompleteReadError, ConnectionResetError):
                    return seen

    def close(self) -> None:
        self.writer.close()


def call_frame(call_id: int, method: str, args: bytes, *, stream: bool = False) -> bytes:
    """A Call whose ``args`` are the MessagePack bytes given, as they are."""
    head = msgspec.msgpack.encode([3, call_id, method])[1:]  # without the array header
    tail = msgspec.msgpack.encode([None, None, stream, None])[1:]
    return frame(b"\x98" + head + args + tail)


class SlowRefusal:
    """An authenticator that takes ``seconds`` to refuse every token (a slow credential store)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.refused = 0

    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        await asyncio.sleep(self.seconds)
        self.refused += 1
        raise Unauthenticated("invalid token")

    async def revalidate(self, principal: Principal) -> Principal | None:
        return principal


async def poll(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, looking every 5 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def run(
    body: Callable[[Server], Awaitable[None]],
    limits: ServerLimits | None = None,
    authenticator: Any = None,
    audit: AuditLog | None = None,
    revalidate_interval: float = 2.0,
) -> None:
    """Run ``body`` against a fresh server; fail on anything asyncio reports as unhandled."""
    unhandled: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        authenticator_ = authenticator or StaticTokens({TOKEN: ADA})
        server = Server(
            [make_service()],
            authenticator=authenticator_,
            limits=limits,
            audit=audit,
            revalidate_interval=revalidate_interval,
        )
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(20):
                await body(server)
        finally:
            await server.shutdown(grace=1)

    asyncio.run(main())
    assert not unhandled, [context.get("exception") or context.get("message") for context in unhandled]


# -- arguments and stream items that are not UTF-8 ------------------------------------------------------


def test_arguments_that_are_not_utf8_are_invalid_argument_and_lose_nothing() -> None:
    """``Call.args`` is a ``Raw`` field: the frame decoder skips over it, so a str in it that is not
    UTF-8 first shows up when the arguments are decoded, as UnicodeDecodeError -- which is no
    msgspec.DecodeError. It escaped ``_on_call`` into ``Link.data_received``: asyncio's "fatal error
    on transport", the connection reset without a word, the other calls of the read lost."""

    async def body(server: Server) -> None:
        raw = await Raw.connect(server)
        raw.send(
            call_frame(1, "hp.shout", b"\x81\xa4text" + BAD_UTF8),  # a str argument
            call_frame(2, "hp.shout_in_task", b"\x81\xa4text" + BAD_UTF8),
            call_frame(3, "hp.echo", b"\x81" + BAD_UTF8 + b"\x01"),  # an argument name
            encode(Call(4, "hp.shout", msgspec.Raw(msgspec.msgpack.encode({"text": "still here"})))),
        )
        answers = await raw.answers_until(4)
        for call_id in (1, 2, 3):
            assert answers[call_id][:3] == [ERROR, call_id, Status.INVALID_ARGUMENT], answers[call_id]
            assert "UTF-8" in answers[call_id][3], answers[call_id]
        assert answers[4] == [RESULT, 4, "STILL HERE"]
        raw.close()

    run(body)


def test_a_stream_item_that_is_not_utf8_fails_its_call_invalid_argument() -> None:
    """A client-stream item is decoded when the handler takes it; one that is not UTF-8 failed the
    call INTERNAL (an unexpected exception, logged with its traceback), not INVALID_ARGUMENT."""

    async def body(server: Server) -> None:
        raw = await Raw.connect(server)
        raw.send(
            call_frame(1, "hp.join", b"\x80", stream=True),
            encode([7, 1, "fine"]),
            frame(b"\x93\x07\x01" + BAD_UTF8),
            encode([8, 1]),
        )
        answer = (await raw.answers_until(1))[1]
        assert answer[:3] == [ERROR, 1, Status.INVALID_ARGUMENT], answer
        assert "UTF-8" in answer[3], answer
        assert server.counters["internal_errors"] == 0
        raw.close()

    run(body)


# -- a refusal that comes after the connection is gone ------------------------------------------------------


def test_a_hello_refused_after_its_connection_closed_leaves_no_failed_task() -> None:
    """The authenticator may answer after the connection is gone: the client hung up, or the
    handshake deadline closed it. Refusing the Hello then raised LocalProtocolError ("cannot send
    GoAway in state closed") in the handshake task: "Task exception was never retrieved", with two
    tracebacks, in the server's log for every such Hello -- a log flood any unauthenticated peer
    could cause by sending a bad token and hanging up."""
    slow = SlowRefusal(0.3)

    async def body(server: Server) -> None:
        hung_up = await Raw.connect(server, hello=False)
        hung_up.send(encode(Hello(1, "hostile/1", "bst_not-a-token")))

        def handshaking() -> bool:
            return any(session.core.state is ConnectionState.HANDSHAKE for session in server.sessions)

        await poll(handshaking, "the server to read the Hello")  # its refusal is on its way
        hung_up.close()
        timed_out = await Raw.connect(server, hello=False)  # the handshake deadline (0.1 s) passes first
        timed_out.send(encode(Hello(1, "hostile/1", "bst_not-a-token")))
        messages = await timed_out.closed()
        assert [m[:3] for m in messages] == [[GOAWAY, 0, Status.DEADLINE_EXCEEDED]], messages
        await poll(lambda: slow.refused == 2, "both Hellos to be refused")
        timed_out.close()

    run(body, limits=ServerLimits(handshake_timeout=0.1), authenticator=slow)


# -- a client's GoAway -----------------------------------------------------------------------------------------


def test_after_a_client_goaway_the_connection_ends_when_its_calls_finish() -> None:
    """A client's GoAway(0, OK) says it will start no more calls: "the connection ends when open
    calls finish" (docs/protocol.md 8.2). With no call open the server closed at once; with calls
    open it closed nothing when they finished (only a draining server looked), and its idle timer
    stopped looking too (it only closes OPEN connections): the connection stayed open as long as
    the client answered pings, past idle_timeout, holding a connection slot."""

    async def body(server: Server) -> None:
        raw = await Raw.connect(server)
        nap = msgspec.Raw(msgspec.msgpack.encode({"seconds": 0.2}))
        raw.send(encode(Call(1, "hp.nap", nap)), encode(Call(2, "hp.nap", nap)), encode([GOAWAY, 0, 0, ""]))
        messages = await raw.closed(timeout=3)  # well before idle_timeout
        assert sorted(m[:3] for m in messages) == [[RESULT, 1, 0.2], [RESULT, 2, 0.2]], messages
        await poll(lambda: not server.sessions, "the session to close")
        raw.close()

    run(body, limits=ServerLimits(idle_timeout=60))


# -- a stream flag that does not match the method ---------------------------------------------------------------


def test_a_call_whose_stream_flag_does_not_match_the_method_is_invalid_argument() -> None:
    """docs/protocol.md 7.1 and 9.1: a Call whose ``stream`` flag does not match the method is
    answered INVALID_ARGUMENT. It was not checked: a client-stream method called with ``stream``
    false waited for items the client could never send (an Item or End on the call is a protocol
    error), so the call hung until cancelled, holding its in-flight slot; a unary method called
    with ``stream`` true ran, and the Items sent on it were dropped without a word."""

    async def body(server: Server) -> None:
        raw = await Raw.connect(server)
        no_args = msgspec.Raw(b"\x80")
        raw.send(
            encode(Call(1, "hp.join", no_args)),  # a client stream, sent as unary
            encode(Call(2, "hp.echo", msgspec.Raw(msgspec.msgpack.encode({"value": 1})), stream=True)),
            encode(Call(3, "hp.shout", msgspec.Raw(msgspec.msgpack.encode({"text": "x"})), stream=True)),  # inline
            encode(Call(4, "hp.join", no_args, stream=True)),
            encode([7, 4, "fine"]),
            encode([8, 4]),
        )
        answers = await raw.answers_until(4)
        for call_id in (1, 2, 3):
            assert answers[call_id][:3] == [ERROR, call_id, Status.INVALID_ARGUMENT], answers
            assert "stream" in answers[call_id][3], answers
        assert answers[4] == [RESULT, 4, "fine"]
        raw.close()

    run(body)


# -- the audit log ---------------------------------------------------------------------------------------------------


def test_a_denied_call_with_a_huge_method_name_writes_a_short_audit_record(tmp_path: Path) -> None:
    """Every denied call is audited (up to 20 per connection per 10 s), and the record named the
    method as the peer wrote it: a Call whose method name fills the frame (1 MiB) wrote 1 MiB to the
    audit file and as much again to the log, on the event loop, for each denial -- an anonymous peer
    could write megabytes per second to the server's disk from each of its connections."""
    audit_path = tmp_path / "audit.jsonl"

    async def body(server: Server) -> None:
        raw = await Raw.connect(server, hello=False)
        raw.send(encode(Hello(1, "hostile/1")))  # anonymous
        assert (await raw.read())[0] == WELCOME
        raw.send(encode(Call(1, "x" * 100_000, msgspec.Raw(b"\x80"))))
        answer = (await raw.answers_until(1))[1]
        assert answer[:3] == [ERROR, 1, Status.UNAUTHENTICATED], answer[:3]
        raw.close()

    run(body, audit=AuditLog(audit_path))
    (line,) = [line for line in audit_path.read_text().splitlines() if '"call.denied"' in line]
    assert len(line) < 1000, len(line)
    assert json.loads(line)["method"].startswith("xxxx")


# -- what a closed connection leaves behind ------------------------------------------------------------------


def test_a_closed_connection_leaves_no_live_timer() -> None:
    """The handshake deadline's timer was never cancelled once the handshake succeeded: the
    keepalive timer took its place in ``_timer``, and ``on_close`` cancelled only that. So every
    connection left a live timer, holding its whole session (core, link, buffers) until
    ``handshake_timeout`` after its accept -- at a high connection rate, thousands of closed
    sessions kept alive."""

    async def body(server: Server) -> None:
        loop = asyncio.get_running_loop()
        raws = [await Raw.connect(server) for _ in range(20)]
        for raw in raws:
            raw.close()
        await poll(lambda: not server.sessions, "the sessions to close")
        scheduled = loop._scheduled  # type: ignore[attr-defined]
        live = [h for h in scheduled if not h.cancelled() and isinstance(h._callback.__self__, ServerSession)]
        assert not live, live[:3]

    run(body, limits=ServerLimits(handshake_timeout=60))


def test_a_closed_connection_leaves_no_revalidation_task() -> None:
    """A connection whose credential can be revoked runs a task re-checking it every
    ``revalidate_interval``; nothing stopped it when the connection closed, so it slept on, holding
    the session, until its next turn (up to 5 s in ``bastion serve``)."""
    revocable = Principal("ada", frozenset({"user"}), token_id="tok_review")

    async def body(server: Server) -> None:
        raws = [await Raw.connect(server) for _ in range(5)]
        for raw in raws:
            raw.close()
        await poll(lambda: not server.sessions, "the sessions to close")
        await asyncio.sleep(0)  # a task cancelled now has ended by the next turn

        def revalidating() -> list[asyncio.Task[Any]]:
            return [t for t in asyncio.all_tasks() if "_revalidate_loop" in repr(t.get_coro())]

        assert not revalidating(), revalidating()[:2]

    run(body, authenticator=StaticTokens({TOKEN: revocable}), revalidate_interval=60)


# -- an answer too deep to encode --------------------------------------------------------------------------


def test_a_result_too_deep_to_encode_fails_its_call_not_the_connection() -> None:
    """A handler's result that msgspec cannot encode for its depth (here it contains itself) raised
    RecursionError from the encoder after part of it was written into the output buffer. The call
    was answered INTERNAL (logged as a handler failure), but the partial frame went first: the
    client saw a corrupt frame and dropped the connection, with every other call on it."""

    async def body(server: Server) -> None:
        raw = await Raw.connect(server)
        no_args = msgspec.Raw(b"\x80")
        raw.send(
            encode(Call(1, "hp.tangle", no_args)),
            encode(Call(2, "hp.tangle_in_task", no_args)),
            encode(Call(3, "hp.echo", msgspec.Raw(msgspec.msgpack.encode({"value": "still here"})))),
        )
        answers = await raw.answers_until(3)
        if 2 not in answers:  # its task may answer after the inline calls
            answers.update(await raw.answers_until(2))
        for call_id in (1, 2):  # answered as any result that cannot be encoded is
            assert answers[call_id][:2] == [ERROR, call_id], answers[call_id]
            assert "result cannot be sent" in answers[call_id][3], answers[call_id]
        assert answers[3] == [RESULT, 3, "still here"]
        raw.close()

    run(body)
